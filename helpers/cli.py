"""Command-line pieces the three training scripts share.

Each script builds its own parser with these groups, so that the flags, their
defaults and their help text are the same in all three. Nothing here imports TensorFlow
at import time: the scripts parse their arguments before they import it.
"""

import argparse
import contextlib
import json
import logging
import os
import re
import sys
from pathlib import Path

from helpers import options, rundir
from helpers.data import DatasetError
from helpers.errors import ProjectError, UsageError

logger = logging.getLogger(__name__)

COMMANDS = ("train", "evaluate", "predict", "caption", "export")



def parse_before_backend(parse_args):
    """Runs a script's ``parse_args()`` before Keras (and so TensorFlow or JAX) is imported, so
    ``--help`` and flag errors answer at once, and sets ``TF_CPP_MIN_LOG_LEVEL=2`` (unless it is
    set) to silence TensorFlow's C++ INFO and WARNING lines. Returns the parsed arguments."""
    args = parse_args()
    problem = missing_backend()
    if problem:
        sys.exit(f"error: {problem}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return args


def missing_backend():
    """The one line to print when the backend Keras would import is not installed, else ``None``.

    Keras takes ``KERAS_BACKEND``, else the ``backend`` of ``$KERAS_HOME/keras.json`` (default
    ``~/.keras``), else TensorFlow; without this check a JAX-only environment gets a 30-line
    ``ModuleNotFoundError: tensorflow`` from ``import keras``.
    """
    import importlib.util

    backend, source = os.environ.get("KERAS_BACKEND"), "KERAS_BACKEND"
    if not backend:
        config = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "keras.json"
        try:
            backend, source = json.loads(config.read_text(encoding="utf-8")).get("backend"), str(config)
        except (OSError, ValueError, AttributeError):
            backend = None
    if not backend:
        backend, source = "tensorflow", "Keras's default; KERAS_BACKEND is not set"
    if importlib.util.find_spec(backend) is not None:
        return None
    installed = [name for name in ("jax", "tensorflow", "torch") if name != backend and importlib.util.find_spec(name)]
    hint = f"set KERAS_BACKEND={installed[0]}" if installed else "install one (requirements.txt or requirements-jax.txt)"
    return f"the Keras backend {backend} ({source}) is not installed; {hint}."


def with_default_command(argv, default="train"):
    """Prepends ``default`` when ``argv`` starts with no command, so
    ``script.py --data-dir D`` means ``script.py train --data-dir D``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS + ("-h", "--help"):
        argv.insert(0, default)
    return argv


def add_data_arguments(parser, data_help="dataset root with train/ and val/ class folders, optionally test/ "
                       "(see helpers/restructure_dataset.py); required", require_data=True):
    group = parser.add_argument_group("data")
    group.add_argument("--data-dir", required=require_data, type=Path, help=data_help)
    group.add_argument("--skip-image-check", action="store_true",
                       help="do not decode every image once before training to find unreadable "
                       "files; the same-image check then compares the files' bytes (default: check)")
    group.add_argument("--allow-duplicates", action="store_true",
                       help="an image (or clip) found in two splits, by its pixels whatever its name, is "
                       "warned about instead of refused, for data known to repeat (default: refused; "
                       "repeats inside one split are warned about)")
    return group


def add_backbone_arguments(group, backbone, image_size, fine_tune_layers, unit="input", layer_examples=""):
    """``--weights``, ``--image-size`` and ``--fine-tune-layers``: the flags of the pretrained
    backbone the three scripts share, defined here once with each script's defaults, and checked
    once (``helpers.backbones.Backbone.check_arguments``, in the flags' words).

    Args:
        backbone: the ``helpers.backbones.Backbone``.
        image_size: the default input size in pixels.
        fine_tune_layers: the default top layers phase 2 fine-tunes; ``None``: all of them.
        unit: what the size is of, for the help (``"input"``, ``"frame"``).
        layer_examples: what some counts unfreeze, for the help (``"6: block 14, ..."``).
    """
    name = backbone.application
    group.add_argument("--weights", default="imagenet",
                       help=f"{name} weights: 'imagenet' (downloaded once by Keras), 'none' "
                       "(random), or the path of a no-top weights file (default: imagenet)")
    group.add_argument("--image-size", type=int, default=image_size,
                       help=f"{unit} size in pixels, >= {backbone.min_size} (default: {image_size})")
    examples = f" ({layer_examples})" if layer_examples else ""
    group.add_argument("--fine-tune-layers", type=int, default=fine_tune_layers, metavar="N",
                       help=f"phase 2 fine-tunes {name}'s top N of its {backbone.layers} layers, 0..{backbone.layers}"
                       f"{examples} (default: {'all' if fine_tune_layers is None else fine_tune_layers})")


def add_training_arguments(parser, epochs=30, fine_tune_epochs=30, batch_size=32, fine_tune_batch_size=16,
                           learning_rate=1e-3, fine_tune_learning_rate=1e-4, lr_schedule="constant", class_weight=True):
    """The training group; ``class_weight=False`` leaves out ``--class-weight`` (captioning: words, not classes)."""
    group = parser.add_argument_group("training")
    group.add_argument("--epochs", type=int, default=epochs,
                       help=f"phase 1 epochs, backbone frozen; 0 skips it (default: {epochs})")
    group.add_argument("--fine-tune-epochs", type=int, default=fine_tune_epochs,
                       help=f"phase 2 epochs, everything fine-tuned; 0 skips it (default: {fine_tune_epochs})")
    group.add_argument("--batch-size", type=int, default=batch_size,
                       help=f"phase 1 batch size (default: {batch_size})")
    group.add_argument("--fine-tune-batch-size", type=int, default=fine_tune_batch_size,
                       help=f"phase 2 batch size (default: {fine_tune_batch_size})")
    group.add_argument("--learning-rate", type=float, default=learning_rate,
                       help=f"phase 1 learning rate (default: {_value_or_recipe(learning_rate)})")
    group.add_argument("--fine-tune-learning-rate", type=float, default=fine_tune_learning_rate,
                       help=f"phase 2 learning rate (default: {_value_or_recipe(fine_tune_learning_rate)})")
    group.add_argument("--train-batchnorm", action="store_true",
                       help="in phase 2, also update the backbone's BatchNormalization statistics "
                       "(default: they stay frozen, in inference mode)")
    group.add_argument("--steps-per-epoch", type=int, default=None,
                       help="batches per epoch (default: the whole training set)")
    group.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    group.add_argument("--lr-schedule", choices=options.LR_SCHEDULES, default=lr_schedule,
                       help="each phase's learning rate: constant; cosine: decayed to 0 over the phase's steps; "
                       f"plateau: divided by 5 after 2 epochs without improvement (default: {lr_schedule})")
    group.add_argument("--warmup-epochs", type=int, default=0,
                       help="linear warm-up from 0 over each phase's first N epochs (constant and cosine) "
                       "(default: 0)")
    group.add_argument("--early-stopping", type=int, default=None, metavar="N",
                       help="stop a phase after N epochs without improvement of the metric its best checkpoint "
                       "follows; the best checkpoint is kept (default: off)")
    if class_weight:
        group.add_argument("--class-weight", choices=options.CLASS_WEIGHTS, default="none",
                           help="balanced: weight each class's loss by samples / (classes x its training samples) "
                           "(default: none)")
    else:
        parser.set_defaults(class_weight="none")
    return group


def _value_or_recipe(value):
    return "the --recipe's" if value is None else f"{value:g}"


def add_feature_cache_argument(group, backbone, item, conditions):
    """``--no-feature-cache`` (``args.feature_cache``): phase 1 trains on the ``backbone``'s
    features of each ``item`` computed once (``helpers.features``) when the ``conditions`` hold."""
    group.add_argument("--no-feature-cache", dest="feature_cache", action="store_false",
                       help=f"phase 1: run {backbone} on every {item} every epoch instead of once (default: each "
                       f"{item}'s {backbone} features are computed once and cached in the output directory when "
                       f"{conditions})")


def add_performance_arguments(parser, distribute=options.DISTRIBUTE):
    """The performance group, with ``--distribute`` of the choices ``distribute`` (and ``--devices``
    where ``mirrored`` is one of them)."""
    group = parser.add_argument_group("performance")
    group.add_argument("--mixed-precision", choices=options.MIXED_PRECISION, default="auto",
                       help="compute dtype of the CNN backbone; recurrent states and gates and the classifier "
                       "stay float32 (under bfloat16 the classifier's LSTMs take their matmuls in bfloat16); "
                       "auto: bfloat16 on a CPU with AVX512_BF16/AMX or a GPU of compute "
                       "capability >= 8, float16 on 7.x, else off (default: auto)")
    group.add_argument("--workers", type=int, default=2,
                       help="threads decoding input (tf.data: parallel calls) (default: 2)")
    if "mirrored" not in distribute:
        group.add_argument("--distribute", choices=distribute, default="none",
                           help="multi-worker: across machines on JAX, one process per machine started with the "
                           "KERAS_DISTRIBUTION_* variables, phases 1 and 2 (phase 3 on one process); the batch sizes "
                           "are then global batches (default: none)")
        parser.set_defaults(devices=None)
        _add_jit_argument(group)
        return group
    group.add_argument("--distribute", choices=distribute, default="none",
                       help="mirrored: all local GPUs (or --devices): tf.distribute.MirroredStrategy on "
                       "TensorFlow, keras.distribution.DataParallel on JAX; multi-worker: across machines, "
                       "TensorFlow's MultiWorkerMirroredStrategy over the cluster in TF_CONFIG (classifier: with "
                       "--input tf.data), or on JAX one process per machine started with the "
                       "KERAS_DISTRIBUTION_* variables (classifier: with --input generator); LRCN: with "
                       "--frames; the batch sizes are then global batches (default: none)")
    group.add_argument("--devices", nargs="+", default=None,
                       help="devices for --distribute mirrored, e.g. /gpu:0 /gpu:1 (TensorFlow) or gpu:0 gpu:1 "
                       "(JAX) (default: all GPUs)")
    _add_jit_argument(group)
    return group


def _add_jit_argument(group):
    group.add_argument("--jit-compile", action="store_true",
                       help="TensorFlow: compile the train step with XLA (see the README's measurements before "
                       "using it on a CPU); on JAX every step is XLA-compiled anyway (default: off)")


def add_output_arguments(parser):
    group = parser.add_argument_group("output")
    group.add_argument("--output-dir", type=Path, default=Path("runs/latest"),
                       help="checkpoints, logs, plots and metrics.json; rerunning the same command "
                       "here resumes (default: runs/latest)")
    _add_verbose_argument(group)
    return group


def check_training_arguments(args):
    """The one check of the training and performance groups' flags (``add_training_arguments``,
    ``add_performance_arguments``: every script's ``train`` has them, or their defaults).

    Raises:
        UsageError: naming a flag whose value cannot work, in the words the user typed.
    """
    values = vars(args)
    for flag in ("epochs", "fine_tune_epochs"):
        if values[flag] < 0:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 0. Received: {values[flag]}")
    for flag in ("batch_size", "fine_tune_batch_size", "steps_per_epoch", "workers"):
        if values[flag] is not None and values[flag] < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1. Received: {values[flag]}")
    for flag in ("learning_rate", "fine_tune_learning_rate"):
        if not values[flag] > 0 or values[flag] == float("inf"):
            raise UsageError(f"--{flag.replace('_', '-')} must be a positive number. Received: {values[flag]}")
    if args.epochs == 0 and args.fine_tune_epochs == 0:
        raise UsageError("--epochs and --fine-tune-epochs are both 0: there is nothing to train.")
    if args.warmup_epochs < 0 or (args.warmup_epochs and args.lr_schedule == "plateau"):
        raise UsageError(f"--warmup-epochs must be >= 0, and works with --lr-schedule constant or cosine. "
                         f"Received: --warmup-epochs {args.warmup_epochs} --lr-schedule {args.lr_schedule}")
    for flag, epochs in (("epochs", args.epochs), ("fine_tune_epochs", args.fine_tune_epochs)):
        if args.warmup_epochs and 0 < epochs <= args.warmup_epochs:
            raise UsageError(f"--warmup-epochs {args.warmup_epochs} leaves nothing after the warm-up of a phase of "
                             f"--{flag.replace('_', '-')} {epochs}; use fewer warm-up epochs.")
    if args.early_stopping is not None and args.early_stopping < 1:
        raise UsageError(f"--early-stopping must be >= 1 epoch. Received: {args.early_stopping}")
    from helpers import backend  # imports Keras: not at the top of this module, which --help loads

    if args.distribute == "multi-worker" and backend.name() not in ("tensorflow", "jax"):
        raise UsageError(f"--distribute multi-worker trains on TensorFlow or JAX; this run is on {backend.name()}.")
    if args.class_weight != "none" and args.distribute == "multi-worker" and backend.is_tensorflow():
        raise UsageError("--class-weight is not available with --distribute multi-worker (its training loop is "
                         "the project's own); use --distribute mirrored or none.")


def check_backbone_arguments(backbone, image_size, fine_tune_layers):
    """``--image-size`` and ``--fine-tune-layers`` (``add_backbone_arguments``) checked by
    ``backbone.check_arguments``, the message in the flags' words.

    Raises:
        UsageError: ``--image-size 64`` below the backbone's minimum, or ``--fine-tune-layers``
            outside ``[0, backbone.layers]``.
    """
    with in_flag_words(("image_size", "fine_tune_layers")):
        backbone.check_arguments(image_size=image_size, fine_tune_layers=fine_tune_layers)


@contextlib.contextmanager
def in_flag_words(names):
    """Re-raises a ``UsageError`` of a builder's argument check in the words the user typed.

    The builders check their Python arguments and echo them (``Received: image_size=64``); a
    command calls those checks inside this context so the message names its flags
    (``Received: --image-size 64``).

    Args:
        names: the Python argument names that come from flags of the same name (``image_size``
            from ``--image-size``).
    """
    try:
        yield
    except UsageError as error:
        message = str(error)
        for name in names:
            flag = "--" + name.replace("_", "-")
            message = re.sub(rf"\b{name}=", f"{flag} ", message)
            message = re.sub(rf"\b{name}\b", flag, message)
        if message == str(error):
            raise
        raise type(error)(message) from error


def trainer_arguments(args):
    """The keyword arguments of ``helpers.training.Trainer`` that come from flags: the one place
    the training controls (``--steps-per-epoch``, ``--lr-schedule``, ``--warmup-epochs``,
    ``--early-stopping``) reach the training core."""
    return {"steps_per_epoch": args.steps_per_epoch, "lr_schedule": args.lr_schedule,
            "warmup_epochs": args.warmup_epochs, "early_stopping": args.early_stopping}


def model_arguments(args, names):
    """``{name: args.<name>}`` for a builder's keyword arguments ``names``: the one place a
    script's model flags reach its builder, and what ``check_resumable`` compares."""
    return {name: vars(args)[name] for name in names}


def check_resumable(args, model_arguments, class_names, labels=(rundir.CLASSES, "class_names")):
    """Refuses to resume a run in ``args.output_dir`` made with another model or other data.

    Args:
        model_arguments: the names of the builder's keyword arguments taken from flags.
        class_names: the classes of ``args.data_dir``'s training split, in index order.
        labels: ``(file, key)``: the run's JSON file and key holding the labels it was trained with
            (captioning: its vocabulary's ``tokens``).

    Raises:
        UsageError: naming each difference (a model flag, ``--data-dir``, the classes, or a
            ``PHASE_FLAGS`` flag of a complete phase), old and new value; nothing in the folder
            (``args.json`` included) has been changed.
    """
    run = rundir.RunDir(args.output_dir)
    if not run.args.is_file() or not run.has_training_logs():
        return
    before, now = json.loads(run.args.read_text(encoding="utf-8")), vars(args)
    changed = [f"--{k.replace('_', '-')} {before.get(k)} -> {now[k]}"
               for k in model_arguments if k in before and before[k] != now[k]]
    if "data_dir" in before and Path(before["data_dir"]).resolve() != Path(args.data_dir).resolve():
        changed.append(f"--data-dir {before['data_dir']} -> {args.data_dir}")
    saved = run.path / labels[0]
    old_classes = json.loads(saved.read_text(encoding="utf-8")).get(labels[1]) if saved.is_file() else None
    if old_classes is not None and old_classes != list(class_names):
        added, removed = sorted(set(class_names) - set(old_classes)), sorted(set(old_classes) - set(class_names))
        changed.append(f"classes ({len(old_classes)} -> {len(class_names)}; added: {', '.join(added[:5]) or 'none'}; "
                       f"removed: {', '.join(removed[:5]) or 'none'})")
    if changed:
        raise UsageError(f"{args.output_dir} holds a run with another model or other data ({'; '.join(changed)}); "
                         "use a new --output-dir, or the same flags and data to resume.")
    for phase, flags in PHASE_FLAGS.items():
        changed = [f"--{k.replace('_', '-')} {before[k]} -> {now[k]}" for k in flags
                   if k in before and k in now and before[k] != now[k]]
        if changed and run.phase_complete(phase):
            raise UsageError(f"{args.output_dir}: {phase} is complete and was trained with other flags "
                             f"({'; '.join(changed)}); a finished phase is not trained again or further. Rerun "
                             "with its flags to go on from there, or use a new --output-dir.")


# The flags of each phase's training: a rerun may not change them once the phase is complete.
PHASE_FLAGS = {"phase1": ("epochs", "batch_size", "learning_rate"),
               "phase2": ("fine_tune_epochs", "fine_tune_batch_size", "fine_tune_learning_rate"),
               "phase3": ("self_critical_epochs", "self_critical_batch_size", "self_critical_samples",
                          "self_critical_learning_rate")}  # captioning's self-critical training


def configure_logging(verbose=False, modules=()):
    """INFO logging to stderr, each line once (TensorFlow's own handler removed: its records go
    through the root's); with ``verbose``, DEBUG for this project's loggers (``helpers.*`` and the
    scripts' ``modules``), not for every library's."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    # TensorFlow gives its logger a handler of its own when the root logger had none at its import:
    # its warnings (retracing, ...) were then printed twice, by it and by the root's handler.
    tensorflow_logger = logging.getLogger("tensorflow")
    for handler in list(tensorflow_logger.handlers):
        tensorflow_logger.removeHandler(handler)
    for name in ("helpers", "__main__", *modules) if verbose else ():
        logging.getLogger(name).setLevel(logging.DEBUG)


def save_args(args, output_dir):
    """Writes the resolved arguments to the run's ``args.json`` (atomically) so a run can be repeated."""
    path = rundir.RunDir(output_dir).args
    values = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
    rundir.write_text(path, json.dumps(values, indent=2) + "\n")
    return path


def run(args, commands):
    """Configures logging and runs ``commands[args.command](args)``.

    A ``helpers.errors.ProjectError`` (bad input, a bad flag, unavailable weights, a
    NaN loss) is logged as one line with exit code 1 (the traceback with
    ``--verbose``), and so is a lost peer under ``--distribute multi-worker``; anything
    else is a bug and raises.
    """
    configure_logging(args.verbose, {command.__module__ for command in commands.values()})
    try:
        return commands[args.command](args) or 0
    except ProjectError as error:
        logger.debug("traceback", exc_info=True)
        logger.error("%s", error)
        return 1
    except Exception as error:
        if args.distribute != "multi-worker" or not _lost_peer(error):
            raise
        logger.debug("traceback", exc_info=True)
        logger.error("another worker of the cluster failed or cannot be reached (%s: %s). Start every worker "
                     "again with the same command: training resumes from the last completed epoch.",
                     type(error).__name__, str(error).splitlines()[0][:300])
        _leave_jax_cluster()
        return 1


# What JAX's collectives and coordination service say when a peer process is gone.
_JAX_LOST_PEER = ("Gloo", "UNAVAILABLE", "DEADLINE_EXCEEDED", "Connection reset", "coordination service")


def _lost_peer(error):
    """True for the errors a dead peer of ``--distribute multi-worker`` raises: TensorFlow's, or
    on JAX a collective's or the coordination service's."""
    tf = sys.modules.get("tensorflow")
    if tf is not None and isinstance(error, (tf.errors.UnavailableError, tf.errors.DeadlineExceededError,
                                             tf.errors.AbortedError, tf.errors.CancelledError)):
        return True
    return "jax" in sys.modules and any(marker in str(error) for marker in _JAX_LOST_PEER)


def _leave_jax_cluster():
    """Ends this process at once when it is one of several JAX processes: leaving normally would
    wait at ``jax.distributed``'s shutdown barrier for the peer that is gone, then abort with a
    C++ stack trace; the one line above is what the user should read."""
    jax = sys.modules.get("jax")
    if jax is None or not jax.distributed.is_initialized() or jax.process_count() == 1:
        return
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def _add_verbose_argument(parser):
    parser.add_argument("--verbose", action="store_true", help="debug logging (default: off)")


def _add_saved_model_arguments(parser):
    parser.add_argument("--model", required=True, type=Path, help="a saved .keras model; required")
    _add_verbose_argument(parser)


def add_evaluate_arguments(parser, batch_size):
    _add_saved_model_arguments(parser)
    parser.add_argument("--data-dir", required=True, type=Path, help="dataset root; required")
    parser.add_argument("--split", choices=("test", "val", "train"), default=None,
                        help="split to score (default: test/ if present, else val/)")
    parser.add_argument("--json", type=Path, help="also write the metrics here (default: print only)")
    parser.add_argument("--batch-size", type=int, default=batch_size, help=f"batch size (default: {batch_size})")


def add_predict_arguments(parser, inputs_help):
    _add_saved_model_arguments(parser)
    parser.add_argument("--top-k", type=int, default=5, help="classes shown per input (default: 5)")
    parser.add_argument("inputs", nargs="+", help=inputs_help)


def check_evaluate_arguments(batch_size, json_path=None, beam_size=1):
    """The ``evaluate`` command's flags, judged before the model loads: ``--batch-size`` (and a
    captioner's ``--beam-size``) >= 1, and a ``--json`` path that can be written.

    Raises:
        UsageError: naming the flag.
    """
    for flag, value in (("--batch-size", batch_size), ("--beam-size", beam_size)):
        if value < 1:
            raise UsageError(f"{flag} must be >= 1. Received: {value}")
    if json_path is not None:
        rundir.check_writable(json_path, "--json")


def evaluation_split_name(args):
    """``--split``, else ``test`` when the data has it, else ``val``.

    Raises:
        DatasetError: the data directory is missing or has neither split.
    """
    if not args.data_dir.is_dir():
        raise DatasetError(f"Data directory {args.data_dir} does not exist.")
    name = args.split or next((s for s in ("test", "val") if (args.data_dir / s).is_dir()), None)
    if name is None:
        raise DatasetError(f"{args.data_dir} has neither a test/ nor a val/ split.")
    return name


def parser_with_commands(description, predict=("predict", "top-k classes of image files or folders"), export=True):
    """A parser with train / evaluate / ``predict`` (/ export) sub-parsers, returned as a tuple
    ``(parser, train, evaluate, predict[, export])``.

    Args:
        predict: ``(name, help)`` of the third command (captioning's is ``caption``).
        export: ``True``: add the classifiers' ``export`` command (``helpers.export``: ``--model``,
            ``--output``, ``--format``); a string: an ``export`` command with this help, ``--model``
            and ``--output``; either way its sub-parser is the fifth element, for the script's own
            flags; ``False``: none.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.set_defaults(distribute="none")  # the commands without --distribute run on one device
    names = ["train", "evaluate", predict[0]] + (["export"] if export else [])
    commands = parser.add_subparsers(dest="command", metavar="{" + ",".join(names) + "}")
    train = commands.add_parser("train", help="train both phases, then evaluate (default command)")
    evaluate = commands.add_parser("evaluate", help="score a saved model on a labelled split")
    third = commands.add_parser(predict[0], help=predict[1])
    if export:
        exporter = commands.add_parser("export", help=export if isinstance(export, str) else (
            "write a saved model for serving: raw RGB pixels 0..255 in, class probabilities out (TensorFlow "
            "SavedModel, TFLite or ONNX; needs the TensorFlow backend)"))
        _add_saved_model_arguments(exporter)
        exporter.add_argument("--output", required=True, type=Path,
                              help="the folder to create (must not exist or be empty); required")
        if not isinstance(export, str):
            exporter.add_argument("--format", choices=options.EXPORT_FORMATS, default="saved_model",
                                  help="saved_model: TensorFlow SavedModel with signatures serve (float32) and "
                                  "serve_uint8; tflite: OUTPUT/model.tflite; onnx: OUTPUT/model.onnx for ONNX Runtime "
                                  "(needs requirements-onnx.txt) (default: saved_model)")
        return parser, train, evaluate, third, exporter
    return parser, train, evaluate, third


def add_tta_argument(parser):
    """``--tta``: the image classifier's test-time augmentation (``helpers.layers.flip_averaged``)."""
    parser.add_argument("--tta", choices=options.TTA, default="none",
                        help="test-time augmentation: flip: each image's probabilities averaged with its mirror "
                        "image's (twice the inference time) (default: none)")
