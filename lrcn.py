#!/usr/bin/env python
"""LRCN for frame sequences: per-frame VGG16 + Dense 2048 + GRU(1024), trained in two phases.

Source: Donahue et al., "Long-term Recurrent Convolutional Networks for Visual
Recognition and Description", CVPR 2015, as the seed write-ups ``002_*.txt`` /
``003_*.txt`` build it in Keras::

    frames (batch, frames, 224, 224, 3), RGB 0..255
      -> per frame (frame_backbone): VGG16 preprocessing -> VGG16 (no top) -> Flatten
      -> head (lrcn_head): Dense(2048) -> Dropout -> GRU(1024, orthogonal kernel) -> Dense(num_classes, softmax)

Clips of per-frame features computed elsewhere (``.npy`` files ``(frames, features)``, e.g.
UCF101's VGG16 fc6 features through ``helpers.ucf101_features``) train the head alone: no
backbone, so one phase. ``--temporal average`` and ``middle-frame`` swap the GRU for the
baselines that see no order (the frames' mean, the middle frame).

``--recipe seed`` is the seed's head and optimizer: linear Dense on the raw features,
dropout 0.5 on it and on the GRU's input and state, GRU bias ones, SGD(momentum 0.9,
clipnorm 1). The default ``--recipe small-data`` is what a few dozen real clips need (the
README's diagnosis): layer-normalised features, ReLU Dense, dropout 0.2, no recurrent
dropout, GRU bias zeros, Adam. Phase 1 trains the head with VGG16 frozen, on cached frame
features when it can (``phase1_inputs``); phase 2 fine-tunes VGG16's top
``fine_tune_layers`` layers (the seed's 5) too.

Usage::

    python lrcn.py [train] --data-dir DATA --output-dir runs/lrcn (--frames 16 | --variable-length) [--weights imagenet|none|PATH]
    python lrcn.py evaluate --model runs/lrcn/phase2_best.keras --data-dir DATA [--json FILE]
    python lrcn.py predict --model runs/lrcn/phase2_best.keras [--top-k 5] FRAME_FOLDER_OR_VIDEO_OR_NPY...
    python lrcn.py predict --model M --over-time --window 2 [--stride 1] --output DIR LONG_VIDEO...
    python lrcn.py export --model runs/lrcn/phase2_best.keras --output DIR [--format saved_model|tflite]

In Python, ``classify(model_or_path, clips, top_k=5)`` returns what ``predict`` prints (with
``window=``, its predictions over time).
"""

import dataclasses
import logging
import os
import sys
from pathlib import Path

from helpers import cli
from helpers.backbones import VGG16


# How a clip's frames combine (--temporal): the LRCN's GRU, or the two baselines that see no order.
TEMPORAL = ("gru", "average", "middle-frame")

# The head's settings and optimizer of each --recipe (README: "LRCN on real footage").
# seed: the seed's (Donahue et al. as seeds 002/003 build it); small-data: what the diagnosis found
# a few dozen real clips need.
RECIPES = {
    "small-data": {"feature_norm": True, "dense_activation": "relu", "dropout": 0.2, "recurrent_dropout": 0.0,
                   "gru_bias": "zeros", "optimizer": "adam", "learning_rate": 1e-3, "fine_tune_learning_rate": 1e-4,
                   "phase1_monitor": "val_accuracy"},
    "seed": {"feature_norm": False, "dense_activation": None, "dropout": 0.5, "recurrent_dropout": 0.5,
             "gru_bias": "ones", "optimizer": "sgd", "learning_rate": 0.01, "fine_tune_learning_rate": 0.001,
             "phase1_monitor": "val_loss"},
}


def parse_args(argv=None):
    parser, train_parser, evaluate_parser, predict_parser, _ = cli.parser_with_commands(
        "LRCN (Donahue et al. 2015; seeds 002/003): per-frame VGG16 + GRU, trained in two phases."
    )
    cli.add_data_arguments(train_parser)
    frames = train_parser.add_argument_group("frames")
    length = frames.add_mutually_exclusive_group(required=True)
    length.add_argument("--frames", type=int, help="fixed length: sample N frames spread evenly over each sequence")
    length.add_argument("--variable-length", action="store_true",
                        help="each sequence at its own length: batch size 1 as in the seed, or padded, "
                        "masked batches bucketed by length when the batch size is above 1")
    frames.add_argument(
        "--length-multiple", type=int, default=8, metavar="N",
        help="with --variable-length, training and validation batches are padded (masked) to a multiple of N "
        "frames, so that JAX, which compiles the train step for every new input shape, compiles it for a few lengths; "
        "1: each batch at its longest clip's length (default: 8)")
    model = train_parser.add_argument_group("model")
    cli.add_backbone_arguments(model, VGG16, image_size=224, fine_tune_layers=5, unit="frame",
                               layer_examples="5: block4_pool and block 5, as the seed")
    model.add_argument("--dense-units", type=int, default=2048, help="per-frame Dense units (default: 2048)")
    model.add_argument("--gru-units", type=int, default=1024, help="GRU units (default: 1024)")
    model.add_argument("--recipe", choices=tuple(RECIPES), default="small-data",
                       help="small-data: layer-normalised frame features, ReLU Dense, dropout 0.2, GRU bias 0, "
                       "Adam 1e-3 then 1e-4; seed: the seed's linear Dense, three dropouts of 0.5, GRU bias ones, "
                       "SGD 0.01 then 0.001 (see the README's LRCN diagnosis) (default: small-data)")
    model.add_argument("--recurrent-dropout", type=float, default=None,
                       help="GRU recurrent dropout; above 0 rules out the fast cuDNN kernel on a GPU "
                       "(default: the recipe's, 0 or the seed's 0.5)")
    model.add_argument("--temporal", choices=TEMPORAL, default="gru",
                       help="how the frames combine: gru, the LRCN; average, the frame-average baseline (the per-frame "
                       "Dense's outputs averaged over the real frames, no order); middle-frame, the single-frame "
                       "baseline (the middle real frame) (default: gru)")
    model.add_argument("--per-frame", action="store_true",
                       help="a label per frame, with --temporal gru (default: one per sequence)")
    train_parser.add_argument("--augment", action="store_true",
                              help="a random crop (80-100%% of the side) and horizontal flip per training clip, the "
                              "same for all its frames (default: off)")
    training_group = cli.add_training_arguments(train_parser, epochs=10, fine_tune_epochs=10, batch_size=8,
                                                fine_tune_batch_size=8, learning_rate=None, fine_tune_learning_rate=None)
    cli.add_feature_cache_argument(training_group, "VGG16", "frame",
                                   "VGG16 is frozen, --frames is fixed, --augment is off and --distribute is none")
    cli.add_performance_arguments(train_parser)
    cli.add_output_arguments(train_parser)

    cli.add_evaluate_arguments(evaluate_parser, batch_size=8)

    predict_parser.add_argument("--max-frames", type=int, default=None,
                                help="frames read from a video at most (default: all)")
    over_time = predict_parser.add_argument_group("predictions over time (long videos)")
    over_time.add_argument("--over-time", action="store_true",
                           help="classify sliding windows of each input instead of the whole, and write DIR/<name>.csv "
                           "and DIR/<name>.png (a timeline) for each; needs --window and --output (default: off)")
    over_time.add_argument("--window", type=float, default=None,
                           help="window length: seconds for a video (its frame rate), frames for a frame folder or "
                           ".npy clip; required with --over-time")
    over_time.add_argument("--stride", type=float, default=None,
                           help="step between window starts, in the window's unit (default: half the window)")
    over_time.add_argument("--output", type=Path, default=None,
                           help="folder for the per-window CSV files and timeline plots; required with --over-time")
    cli.add_predict_arguments(predict_parser, "frame folders, video files (mp4, avi) or .npy feature clips")
    args = parser.parse_args(cli.with_default_command(argv))
    if args.command == "train":  # the recipe's values where no flag gave one
        for name in ("recurrent_dropout", "learning_rate", "fine_tune_learning_rate"):
            if getattr(args, name) is None:
                setattr(args, name, RECIPES[args.recipe][name])
    return args


if __name__ == "__main__":
    ARGS = cli.parse_before_backend(parse_args)

import keras  # noqa: E402
import numpy as np  # noqa: E402

from helpers import backend, data, distribute, features, multiworker, precision, reports, sequences, training  # noqa: E402
from helpers.backbones import pretrained_backbone  # noqa: E402
from helpers.errors import UsageError  # noqa: E402
from helpers.layers import FoldFrames, FrameMask, MiddleFrame, VGG16Preprocess  # noqa: E402
from helpers.optimizers import FusedAdam  # noqa: E402

logger = logging.getLogger(__name__)

BACKBONE = VGG16.name
# The builder's keyword arguments that come from flags of the same name: passed from here
# (``cli.model_arguments``), and compared by the resume check.
MODEL_ARGUMENTS = ("image_size", "frames", "dense_units", "gru_units", "fine_tune_layers", "per_frame",
                   "recurrent_dropout", "mixed_precision", "recipe", "temporal", "feature_width")


def check_model_arguments(num_classes, frames, image_size, dense_units, gru_units, fine_tune_layers, recurrent_dropout,
                          feature_width=None, temporal="gru", per_frame=False):
    """Raises ``UsageError`` (a ``ValueError``) echoing the first argument the model cannot be built with."""
    if temporal not in TEMPORAL:
        raise UsageError(f"temporal must be one of {', '.join(TEMPORAL)}. Received: temporal={temporal!r}")
    if per_frame and temporal != "gru":
        raise UsageError(f"per_frame needs temporal gru: the baselines give one label per sequence. "
                         f"Received: temporal={temporal}")
    if feature_width is not None and feature_width < 1:
        raise UsageError(f"feature_width must be None (frames) or at least 1. Received: feature_width={feature_width}")
    if num_classes < 2:
        raise UsageError(f"num_classes must be at least 2. Received: num_classes={num_classes}")
    VGG16.check_arguments(image_size=image_size, fine_tune_layers=fine_tune_layers)
    if frames is not None and frames < 1:
        raise UsageError(f"frames must be None (variable) or at least 1. Received: frames={frames}")
    if dense_units < 1 or gru_units < 1:
        raise UsageError(f"dense_units and gru_units must be at least 1. Received: {dense_units}, {gru_units}")
    if not 0 <= recurrent_dropout < 1:
        raise UsageError(f"recurrent_dropout must be in [0, 1). Received: recurrent_dropout={recurrent_dropout}")


def build_lrcn(num_classes, frames=None, image_size=224, dense_units=2048, gru_units=1024, fine_tune_layers=5,
               per_frame=False, weights="imagenet", recurrent_dropout=None, mixed_precision="off", recipe="small-data",
               temporal="gru", feature_width=None):
    """Builds the LRCN: a per-frame VGG16 backbone and a recurrent head, or the head alone on feature clips.

    Args:
        num_classes: number of classes, at least 2.
        frames: frames per sample, or ``None`` for variable-length input.
        image_size: frame height and width in pixels, at least 32 (VGG16's minimum).
        dense_units: units of the per-frame ``Dense`` after Flatten (the seed's 2048).
        gru_units: GRU units (the seed's 1024).
        fine_tune_layers: VGG16's top layers that phase 2 fine-tunes, in [0, 19]
            (the seed's 5: block4_pool and block5). All of VGG16 is frozen until then.
        per_frame: return a label per frame, ``(batch, frames, num_classes)``, the
            other LRCN output the seed mentions; else one per sequence.
        weights: VGG16 weights: ``"imagenet"``, ``None``/``"none"``, or a no-top weights file path.
        recurrent_dropout: the GRU's recurrent dropout; ``None``: the recipe's (seed 0.5,
            small-data 0). Above 0 rules out the fused cuDNN GRU kernel on a GPU, which is
            several times faster (a warning says so when a GPU is visible).
        mixed_precision: ``"off"``, ``"bfloat16"``, ``"float16"`` or ``"auto"``
            (``helpers.precision.resolve``): the compute dtype of VGG16 only; the
            head stays float32.
        recipe: the head (``RECIPES``). ``"seed"``: linear ``Dense`` on the raw flattened
            VGG16 features, dropout 0.5 on it and on the GRU's input, GRU bias ones (as the
            seed). ``"small-data"``: the features layer-normalised first
            (``feature_norm``), ReLU ``Dense``, dropout 0.2, GRU bias zeros.
        temporal: how the frames combine after the per-frame ``Dense``: ``"gru"`` (the
            LRCN), ``"average"`` (their mean over the real frames, ``frame_average``: the
            frame-average baseline, blind to order) or ``"middle-frame"`` (the middle real
            frame alone, ``middle_frame``: the single-frame baseline).
        feature_width: features per frame of feature clips: the model is the head alone,
            without VGG16 (``image_size``, ``fine_tune_layers``, ``weights`` and
            ``mixed_precision`` then unused); ``None``: frames through VGG16.

    Returns:
        A functional ``keras.Model`` ``lrcn``. Input ``(batch, frames, image_size,
        image_size, 3)`` float32 RGB in 0..255 (VGG16's preprocessing is inside the model);
        padded frames hold ``helpers.layers.PAD_VALUE`` (-1) and are masked. Output
        ``(batch, num_classes)`` (or ``(batch, frames, num_classes)``) softmax float32.
        Inside: ``per_frame_cnn`` folds the frames through ``frame_backbone`` (VGG16
        preprocessing, ``vgg16``, Flatten: ``(batch, frames, features)`` with
        ``features = (image_size // 32)**2 * 512``), then ``lrcn_head`` (inputs
        ``[features, mask]``; layers ``frame_dense``, ``gru``, ``predictions``), which
        phase 1 trains alone on cached backbone features. With ``feature_width``: input
        ``(batch, frames, feature_width)`` float32 features, padded frames all
        ``PAD_VALUE`` (masked), the same output, through the same ``lrcn_head``.

    Raises:
        helpers.errors.UsageError: an argument is out of range (a ``ValueError``; the
            message echoes it).
        helpers.errors.MissingFileError, helpers.backbones.WeightsUnavailableError: as for the weights.
    """
    if recipe not in RECIPES:
        raise UsageError(f"recipe must be one of {', '.join(RECIPES)}. Received: recipe={recipe!r}")
    settings = RECIPES[recipe]
    recurrent_dropout = settings["recurrent_dropout"] if recurrent_dropout is None else recurrent_dropout
    check_model_arguments(num_classes, frames, image_size, dense_units, gru_units, fine_tune_layers, recurrent_dropout,
                          feature_width, temporal, per_frame)
    if feature_width is None:
        frame = keras.Input((image_size, image_size, 3), name="frame")
        backbone = pretrained_backbone(VGG16.constructor(), weights, precision.resolve(mixed_precision),
                                       input_shape=(image_size, image_size, 3))
        flat = keras.layers.Flatten(name="flatten", dtype="float32")(
            backbone(VGG16Preprocess(name="vgg16_preprocess")(frame)))
        frame_backbone = keras.Model(frame, flat, name="frame_backbone")

    features = keras.Input((frames, feature_width or flat.shape[-1]), name="frame_features")
    mask = keras.Input((frames,), dtype="bool", name="mask")
    x = keras.layers.LayerNormalization(name="feature_norm")(features) if settings["feature_norm"] else features
    x = keras.layers.Dense(dense_units, activation=settings["dense_activation"], name="frame_dense")(x)
    x = keras.layers.Dropout(settings["dropout"], name="frame_dropout")(x)
    if temporal == "average":
        x = keras.layers.GlobalAveragePooling1D(name="frame_average")(x, mask=mask)
    elif temporal == "middle-frame":
        x = MiddleFrame(name="middle_frame")([x, mask])
    else:
        if recurrent_dropout and precision.gpu_compute_capability() is not None:
            logger.warning("recurrent_dropout=%g rules out the fused cuDNN GRU kernel on this GPU (several "
                           "times slower); --recurrent-dropout 0 allows it", recurrent_dropout)
        x = keras.layers.GRU(
            gru_units, kernel_initializer="orthogonal", bias_initializer=settings["gru_bias"],
            dropout=settings["dropout"], recurrent_dropout=recurrent_dropout, return_sequences=per_frame, name="gru",
        )(x, mask=mask)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="predictions")(x)
    head = keras.Model([features, mask], outputs, name="lrcn_head")

    if feature_width is not None:  # feature clips: the head alone
        inputs = keras.Input((frames, feature_width), name="clip_features")
        return keras.Model(inputs, head([inputs, FrameMask(name="frame_mask")(inputs)]), name="lrcn")
    inputs = keras.Input((frames, image_size, image_size, 3), name="frames")
    frame_mask = FrameMask(name="frame_mask")(inputs)  # (batch, frames): False on padding
    per_frame_features = FoldFrames(frame_backbone, name="per_frame_cnn")(inputs)  # (batch, frames, features)
    return keras.Model(inputs, head([per_frame_features, frame_mask]), name="lrcn")


def phase1_optimizer(learning_rate, recipe="small-data"):
    """Phase 1's optimizer, the ``recipe``'s: the seed's ``sgd``, or Adam (its update fused,
    ``helpers.optimizers.FusedAdam``) with the same gradient clipping.

    Args:
        learning_rate: a float or a schedule (``training.Trainer.learning_rate``).
        recipe: a key of ``RECIPES``.
    """
    if RECIPES[recipe]["optimizer"] == "sgd":
        return sgd(learning_rate)
    return FusedAdam(learning_rate=learning_rate, clipnorm=1.0)


def fine_tune_optimizer(learning_rate, recipe="small-data"):
    """Phase 2's optimizer: phase 1's (the ``recipe``'s), at phase 2's learning rate."""
    return phase1_optimizer(learning_rate, recipe)


def sgd(learning_rate):
    """The seed's SGD(momentum 0.9) with gradient clipping.

    Keras 3 accepts only one of ``clipnorm`` and ``clipvalue``; the seed set both
    (1.0 and 0.5). We keep ``clipnorm=1.0``: it rescales each gradient as a whole,
    keeping its direction, while ``clipvalue`` clips every element on its own and
    can turn the update. The seed found clipping mattered; norm clipping is what
    the RNN literature it followed recommends.
    """
    return keras.optimizers.SGD(learning_rate=learning_rate, momentum=0.9, clipnorm=1.0)


def compile_lrcn(model, optimizer, jit_compile=False):
    """Compiles for one-hot labels: categorical cross-entropy and accuracy, plus top-5
    accuracy (``top5_accuracy``) with more than 5 classes; float16 loss scaling when the
    backbone computes in float16 (``precision.loss_scaled``)."""
    metrics = ["accuracy"]
    if model.output_shape[-1] > 5:
        metrics.append(keras.metrics.TopKCategoricalAccuracy(k=5, name="top5_accuracy"))
    model.compile(optimizer=precision.loss_scaled(model, optimizer), loss="categorical_crossentropy",
                  metrics=metrics, jit_compile=backend.jit_compile(jit_compile))


def _sharded_input(splits, args, batch_size):
    """``(train, val)`` ``multiworker.ShardedInput``s for ``--distribute multi-worker``: each input pipeline
    reads every n-th sample with a ``FrameSequences``, wrapped in ``tf.data``."""
    import tensorflow as tf

    def dataset_fn(training, context):
        split = splits["train" if training else "val"]
        every, first = context.num_input_pipelines, context.input_pipeline_id
        shard = dataclasses.replace(split, samples=split.samples[first::every], labels=split.labels[first::every])
        per_replica = context.get_per_replica_batch_size(batch_size)
        reader = sequences.FrameSequences(shard, args.image_size, per_replica, args.frames, shuffle=training,
                                          seed=args.seed + first, workers=args.workers,
                                          augment=training and args.augment)

        def batches():
            while True:
                for index in range(len(reader)):
                    x, y = reader[index]
                    if len(x) == per_replica:  # whole batches only
                        yield x, y
                reader.on_epoch_end()
                if not training:
                    return

        signature = (tf.TensorSpec((per_replica, args.frames, *clip_shape(args)), tf.float32),
                     tf.TensorSpec((per_replica, len(split.class_names)), tf.float32))
        return tf.data.Dataset.from_generator(batches, output_signature=signature).prefetch(2)

    return multiworker.ShardedInput.train_and_val(dataset_fn, batch_size, len(splits["train"].samples),
                                                  len(splits["val"].samples), "sequences")


def clip_shape(args):
    """A frame's shape in a batch: ``(feature_width,)`` for feature clips, else ``(image_size, image_size, 3)``."""
    return (args.feature_width,) if args.feature_width else (args.image_size, args.image_size, 3)


def training_data(splits, args, batch_size, strategy=None):
    """``(train, val)`` ``FrameSequences`` for a phase's ``batch_size``; under
    ``--distribute multi-worker``, each worker's shards. With ``--variable-length`` on
    TensorFlow they are read through ``tf.data`` with the frames axis declared free
    (``backend.tf_dataset_with_free_shapes``): Keras would otherwise fix it from the first two
    batches and refuse a longer one."""
    if multiworker.is_multi_worker(strategy):
        return _sharded_input(splits, args, batch_size)
    data = distribute.process_slices(strategy, {  # several JAX processes: each its slice of every batch
        name: sequences.FrameSequences(splits[name], args.image_size, batch_size, args.frames, shuffle=fitting,
                                       seed=args.seed, per_frame=args.per_frame, workers=args.workers,
                                       augment=fitting and args.augment, length_multiple=args.length_multiple)
        for name, fitting in (("train", True), ("val", False))}, batch_size)
    if args.frames or not backend.is_tensorflow():
        return data
    import tensorflow as tf  # variable length on TensorFlow: the frames axis declared free

    classes = len(splits["train"].class_names)
    signature = (tf.TensorSpec((None, None, *clip_shape(args)), tf.float32),
                 tf.TensorSpec((None, None, classes) if args.per_frame else (None, classes), tf.float32))
    replicas = strategy.num_replicas_in_sync if strategy else 1  # the partial last batch dropped first
    return tuple(backend.tf_dataset_with_free_shapes(distribute.replica_safe(reader, replicas, what), signature)
                 for reader, what in zip(data, ("training", "validation")))


def phase1_inputs(model, splits, args, trainer, strategy=None):
    """``(fitted_model, train, val)`` for phase 1.

    With VGG16 frozen, a fixed ``--frames``, no ``--augment`` and no ``--distribute``, every
    sampled frame's ``frame_backbone`` output is computed once (``helpers.features``, the
    cache the captioner uses: ``features/<split>-<key>.npy``, float32 ``(clips * frames,
    (image_size // 32)**2 * 512)``, read the same way as the uncached path, PIL), and the
    head ``lrcn_head`` trains on it: the same losses and weights as the whole model on the
    same batches (tested). Otherwise (or with ``--no-feature-cache``) the whole model trains
    from the frames (``training_data``); the log says which and why.
    """
    if args.feature_width:  # feature clips: the model is the head, which trains on them as they are
        return (model, *training_data(splits, args, args.batch_size, strategy))
    if not features.phase1_on_cache(trainer, "VGG16", "frame", args.epochs, args.feature_cache, args.augment,
                                     args.distribute, off=((not args.frames, "--variable-length"),)):
        return (model, *training_data(splits, args, args.batch_size, strategy))
    backbone = training.find_layer(model, "frame_backbone")
    size = args.image_size

    def load(paths):
        return sequences.load_frames(paths, size)

    datasets = []
    for name in ("train", "val"):
        split = splits[name]
        paths = [p for sample in split.samples for p in sequences.sampled_paths(sample, args.frames)]
        cached = features.cached_features(backbone, paths, trainer.run.features, name, loader=load)
        frame_features = cached.reshape(len(split), args.frames, -1)
        labels = sequences.one_hot(split.labels, len(split.class_names), args.frames if args.per_frame else None)
        datasets.append(features.array_batches((frame_features, np.ones(frame_features.shape[:2], bool)), labels,
                                               args.batch_size, shuffle=name == "train", seed=args.seed))
    logger.info("phase 1: the head trains on cached VGG16 features of %d x %d frames (%s)", len(splits["train"]),
                args.frames, trainer.run.features)
    return (training.find_layer(model, "lrcn_head"), *datasets)


def train(args):
    """The ``train`` command: two phases, then evaluation (and on shuffled frames) and the report.

    On feature clips (``.npy``) the model is the head alone and phase 1 is the whole training:
    there is no VGG16 to fine-tune, so phase 2 is skipped (and said so).

    Phase 1 freezes VGG16 and trains the head (per-frame Dense, GRU, classifier); its best
    checkpoint is the highest validation accuracy (``--recipe seed``: the lowest validation
    loss, which on a few dozen clips picks a nearly untrained epoch). Phase 2 starts from it and
    fine-tunes VGG16's top ``--fine-tune-layers`` layers too; best by validation
    accuracy. Both use the recipe's optimizer (``phase1_optimizer``, ``fine_tune_optimizer``).

    Raises:
        helpers.errors.ProjectError: bad input or flags, unavailable weights, a NaN
            loss; reported by ``main`` as one line.
    """
    cli.check_training_arguments(args)
    cli.check_backbone_arguments(VGG16, args.image_size, args.fine_tune_layers)
    if args.length_multiple < 1:
        raise UsageError(f"--length-multiple must be >= 1. Received: {args.length_multiple}")
    if args.class_weight != "none" and args.per_frame:
        raise UsageError("--class-weight needs one label per sequence: Keras weighs classes of 2-D targets only, "
                         "not --per-frame labels.")
    if args.distribute == "multi-worker" and (not args.frames or args.per_frame):
        raise UsageError("--distribute multi-worker needs --frames N and one label per sequence (not "
                         "--variable-length or --per-frame): every worker must run the same number of equal steps.")
    strategy = distribute.training_strategy(args.distribute, args.devices, args.batch_size,
                                             args.fine_tune_batch_size)
    splits = {"train": sequences.list_sequences(args.data_dir / "train")}
    names = splits["train"].class_names
    for name in ("val", "test"):
        if name == "val" or (args.data_dir / name).is_dir():
            splits[name] = sequences.list_sequences(args.data_dir / name, names)
    sequences.check_same_kind(list(splits.values()))
    args.feature_width = splits["train"].features  # None: frames through VGG16
    if args.feature_width and args.augment:
        raise UsageError("--augment crops and flips frames; feature clips (.npy) have no pixels to augment.")
    with cli.in_flag_words(MODEL_ARGUMENTS):
        check_model_arguments(len(names), args.frames, args.image_size, args.dense_units, args.gru_units,
                              args.fine_tune_layers, args.recurrent_dropout, args.feature_width, args.temporal,
                              args.per_frame)
    class_weight = (training.balanced_class_weights(splits["train"].labels, len(names))
                    if args.class_weight == "balanced" else None)
    # The run directory's lock is held from here on: a second run on it stops at once.
    with training.Trainer(args.output_dir, strategy, **cli.trainer_arguments(args)) as trainer:
        cli.check_resumable(args, MODEL_ARGUMENTS, names)
        sequences.check_splits(splits, args.skip_image_check, args.allow_duplicates)
        if trainer.chief:
            cli.save_args(args, args.output_dir)
            reports.write_json(trainer.run.classes, {"class_names": names, "layout": splits["train"].layout})
        keras.utils.set_random_seed(args.seed)
        with trainer.scope():
            model = build_lrcn(num_classes=len(names), weights=args.weights, **cli.model_arguments(args, MODEL_ARGUMENTS))

            # Phase 1: VGG16 frozen; the head trains, from each frame's VGG16 features computed once
            # when they can be cached (phase1_inputs), or from the feature clips themselves; best by
            # the recipe's monitor (val accuracy, or the seed's val loss).
            if not args.feature_width:
                training.set_backbone_trainable(model, BACKBONE, False)
            model.summary(print_fn=logger.info, line_length=110)
            fitted, train_data, val_data = phase1_inputs(model, splits, args, trainer, strategy)
            compile_lrcn(fitted, phase1_optimizer(trainer.learning_rate(args.learning_rate, args.epochs, train_data),
                                                  args.recipe), args.jit_compile)
            best = trainer.fit(fitted, "phase1", train_data, val_data, epochs=args.epochs,
                               monitor=RECIPES[args.recipe]["phase1_monitor"], class_weight=class_weight, save=model,
                               title="the head on feature clips" if args.feature_width else "phase 1: VGG16 frozen")

            # Phase 2: from phase 1's best, VGG16's top layers fine-tuned too; best by val accuracy.
            if args.feature_width:
                logger.info("phase 2: skipped: feature clips have no VGG16 to fine-tune")
            else:
                model = training.best_model(best, model)
                training.set_backbone_trainable(model, BACKBONE, True, top_layers=args.fine_tune_layers)
                train_data, val_data = training_data(splits, args, args.fine_tune_batch_size, strategy)
                compile_lrcn(model, fine_tune_optimizer(trainer.learning_rate(
                    args.fine_tune_learning_rate, args.fine_tune_epochs, train_data), args.recipe), args.jit_compile)
                best = trainer.fit(model, "phase2", train_data, val_data, epochs=args.fine_tune_epochs,
                                   monitor="val_accuracy", class_weight=class_weight,
                                   title=f"phase 2: VGG16's top {args.fine_tune_layers} layers fine-tuned") or best

        if not trainer.chief:  # the chief evaluates and reports
            distribute.cleanup(strategy, args.output_dir)
            return 0
        split = splits[data.evaluation_split(splits, args.data_dir, "python -m helpers.extract_frames VIDEOS "
                                             "--test-fraction F splits one off by group")]
        model = keras.saving.load_model(best)
        metrics = evaluate_lrcn(model, split, args.batch_size, args.workers)
        shuffled = evaluate_lrcn(model, split, args.batch_size, args.workers, shuffle_frames=True)
        metrics["shuffled_frames_top1"] = shuffled["top1"]
        reports.save_evaluation(args.output_dir, metrics, best, names)
        print(f"top-1 with each clip's frames shuffled: {100 * shuffled['top1']:.2f}% "
              f"(chance {100 / len(names):.0f}%)")


class _ShuffledFrames(sequences.FrameSequences):
    """The same clips with their frames in a random order (checks that the GRU reads the order)."""

    def load_clip(self, index):
        clip = super().load_clip(index)
        return clip[np.random.default_rng(index).permutation(len(clip))]


def evaluate_lrcn(model, split, batch_size, workers=2, shuffle_frames=False):
    """Scores ``model`` on every sample of a ``SequenceSplit`` (``lrcn_probabilities``).

    Returns:
        ``reports.classification_metrics`` plus ``split``; ``top5`` only with more than 5 classes.
    """
    probabilities, labels = lrcn_probabilities(model, split, batch_size, workers, shuffle_frames)
    metrics = {"split": split.directory.name}
    metrics.update(reports.classification_metrics(probabilities, labels, split.class_names))
    if len(split.class_names) <= 5:
        del metrics["top5"], metrics["top_k"]
    return metrics


def lrcn_probabilities(model, split, batch_size, workers=2, shuffle_frames=False):
    """``model``'s class probabilities of every sample of a ``SequenceSplit``, and their labels.

    Variable-length models see each sample at its own length (batch 1, no padding).
    A per-frame model's clip prediction is the mean of its frame probabilities. With
    ``shuffle_frames`` each clip's frames are in a random order (fixed per clip).

    Returns:
        ``(probabilities, labels)``: float32 ``(samples, num_classes)`` and the class index of
        each sample, in the same order.

    Raises:
        helpers.data.DatasetError: the split's clips are not what the model reads (``check_clips_fit``).
    """
    frames = model.input_shape[1]
    check_clips_fit(model, split)
    size = model.input_shape[2] if len(model.input_shape) == 5 else None  # None: feature clips
    kind = _ShuffledFrames if shuffle_frames else sequences.FrameSequences
    dataset = kind(split, size, batch_size if frames else 1, frames, shuffle=False, workers=workers)
    probabilities = model.predict(dataset, verbose=training.progress_verbosity())
    if probabilities.ndim == 3:
        probabilities = probabilities.mean(axis=1)
    return probabilities, dataset.labels


def check_clips_fit(model, split):
    """Raises ``DatasetError`` when ``split``'s clips are not what ``model`` reads (frames for a
    VGG16 model, feature clips of its width for a head-only one), naming a clip and the model's input."""
    width = sequences.feature_width(model)
    if split.features != width:
        clips = f"{split.features} features per frame" if split.features else "frames"
        wanted = f"feature clips of {width} features per frame" if width else "frame folders or videos"
        raise data.DatasetError(f"{split.samples[0]} holds {clips}; this model reads {wanted}.")


def evaluate(args):
    """The ``evaluate`` command."""
    cli.check_evaluate_arguments(args.batch_size, args.json)
    model, classes = training.load_checkpoint(args.model, "lrcn")
    split = sequences.list_sequences(args.data_dir / cli.evaluation_split_name(args), classes.get("class_names"))
    sequences.check_sequences(split)
    metrics = evaluate_lrcn(model, split, args.batch_size)
    metrics["model"] = str(args.model)
    print(reports.format_report(metrics))
    if args.json:
        reports.write_json(args.json, metrics)


def classify(model, clips, top_k=5, class_names=None, max_frames=None, window=None, stride=None):
    """The ``top_k`` most probable classes of each clip: the Python API ``predict`` prints.

    Args:
        model: a saved ``.keras`` LRCN (its class names from the ``classes.json`` beside
            it) or a loaded ``keras.Model``.
        clips: for a model on frames: frame folders, video files
            (``helpers.video.read_video``) and/or arrays ``(frames, height, width, 3)``
            RGB 0..255 of any frame size (resized bilinearly); for a model on feature clips:
            ``.npy`` files and/or arrays ``(frames, features)``. A fixed-length model samples its
            frames evenly (``sequences.sample_indices``); a variable-length one reads them all.
            A single path or array is one clip.
        top_k: classes per clip (capped at the number of classes).
        class_names: the classes in index order (default: the run's ``classes.json``).
        max_frames: frames read from a video at most (default: all).
        window, stride: predictions over time (``helpers.timeline``): each clip in sliding
            windows of ``window`` (seconds for a video, frames otherwise) every ``stride``
            (default: half the window), read as a stream; ``None``: each clip whole.

    Returns:
        Per clip, ``[(class_name, probability), ...]``, most probable first; a per-frame
        model's clip probabilities are the mean over its frames. With ``window``, per clip a
        list of windows ``{"start": s, "end": e, "unit": "s" | "frames", "classes": [(class_name,
        probability), ...]}``.

    Raises:
        helpers.errors.UsageError, helpers.data.DatasetError, helpers.video.VideoError:
            a bad argument, an empty or undecodable frame folder, an unreadable video, a clip of
            another kind than the model reads (frames against feature clips).
    """
    from helpers import timeline, video

    if top_k < 1:
        raise UsageError(f"top_k must be >= 1. Received: {top_k}")
    if isinstance(clips, (str, os.PathLike, np.ndarray)):
        clips = [clips]
    model, names, _ = training.model_and_classes(model, "lrcn", class_names)
    frames = model.input_shape[1]
    width = sequences.feature_width(model)  # None: frames through VGG16
    size = None if width else model.input_shape[2]
    for index, item in enumerate(clips):
        check_clip_kind(item, index, width)
    if window is not None:
        results = []
        for item in clips:
            rows, unit = timeline.predict_over_time(model, item, window, stride, max_frames)
            results.append([{"start": start, "end": end, "unit": unit, "classes": reports.top_k(scores, names, top_k)}
                            for start, end, scores in rows])
        return results
    ranked = []
    for index, item in enumerate(clips):
        if isinstance(item, (str, os.PathLike)) and Path(item).is_dir():
            paths = sequences.frame_files(item)
            if not paths:
                raise data.DatasetError(f"{item} holds no frames.")
            data.check_images(paths)
            clip = sequences.load_frames(paths, size)
        elif isinstance(item, (str, os.PathLike)) and width:
            clip = np.stack(list(timeline.frame_source(item, None)[0]))
        elif isinstance(item, (str, os.PathLike)):
            clip = video.read_video(item, size=size, max_frames=max_frames).astype(np.float32)
        elif width:
            clip = np.asarray(item, np.float32)
        else:
            clip = np.stack([data.rgb_array(frame, size, f"clip {index}, frame {t}")
                             for t, frame in enumerate(np.asarray(item))])
        if frames:
            clip = clip[sequences.sample_indices(len(clip), frames)]
        scores = model.predict(clip[None], verbose=0)[0]
        ranked.append(reports.top_k(scores.mean(axis=0) if scores.ndim == 2 else scores, names, top_k))
    return ranked


def check_clip_kind(item, index, width):
    """Raises ``UsageError`` naming clip ``index`` when it is not what the model reads: a ``.npy`` file
    or a 2-D array ``(frames, width)`` of finite numbers for a model on feature clips (``width``),
    a frame folder, video or 4-D array for one on frames (``width`` ``None``)."""
    is_path = isinstance(item, (str, os.PathLike))
    if is_path:
        feature_clip = Path(item).suffix.lower() == sequences.CLIP_EXTENSION
        shape = None
    else:
        array = np.asarray(item)
        feature_clip, shape = array.ndim == 2, array.shape
        if array.dtype.kind not in "fiu" or array.size == 0 or (array.dtype.kind == "f" and not np.isfinite(array).all()):
            raise UsageError(f"clip {index}: an array of finite real numbers is needed. Received: dtype {array.dtype}, "
                             f"shape {array.shape}")
    what = item if is_path else f"clip {index} (shape {shape})"
    if width and not feature_clip:
        raise UsageError(f"{what}: this model reads feature clips (.npy files or arrays (frames, {width})), not frames.")
    if not width and feature_clip:
        raise UsageError(f"{what}: this model reads frames (frame folders, videos, arrays (frames, height, width, 3)), "
                         "not feature clips.")
    if width and shape is not None and shape[1] != width:
        raise UsageError(f"{what}: this model reads {width} features per frame.")


def predict(args):
    """The ``predict`` command: top-k classes of frame folders, videos or feature clips (``classify``);
    with ``--over-time``, of sliding windows of each, written to ``--output`` as a CSV file and a
    timeline plot per input (``helpers.timeline``)."""
    from helpers import rundir, timeline

    if args.top_k < 1:  # named by flag, before the model loads
        raise UsageError(f"--top-k must be >= 1. Received: {args.top_k}")
    if args.over_time:
        if args.window is None or args.output is None:
            raise UsageError("--over-time needs --window (seconds for a video, frames otherwise) and --output DIR.")
        timeline.check_window(args.window, args.stride)  # judged before the model loads
        stems = {}
        for item in args.inputs:
            stem = Path(item).stem or "input"
            if stem in stems:
                raise UsageError(f"{stems[stem]} and {item} would both write {stem}.csv in --output; predict them in "
                                 "two runs, or rename one.")
            stems[stem] = item
        rundir.check_writable(args.output, "--output", folder=True, empty=False)
    elif args.window is not None or args.stride is not None or args.output is not None:
        raise UsageError("--window, --stride and --output go with --over-time.")
    model, names, descriptions = training.model_and_classes(args.model, "lrcn")
    if not args.over_time:
        for item, ranked in zip(args.inputs, classify(model, args.inputs, args.top_k, names, args.max_frames)):
            reports.print_ranked(item, ranked, descriptions)
        return
    for item in args.inputs:
        check_clip_kind(item, 0, sequences.feature_width(model))
        rows, unit = timeline.predict_over_time(model, item, args.window, args.stride, args.max_frames)
        print(item)
        for start, end, scores in rows:
            ranked = reports.top_k(scores, names, args.top_k)
            print(f"  {start:g}-{end:g}{'s' if unit == 's' else ''}: " + ", ".join(f"{c} {p:.3f}" for c, p in ranked))
        csv_path, png_path = timeline.write_timeline(rows, unit, names, args.top_k, args.output, Path(item).stem or "input")
        print(f"  -> {csv_path}, {png_path}")


def export(args):
    """The ``export`` command: a SavedModel or TFLite model taking raw RGB frames 0..255 (``helpers.export``)."""
    from helpers import export as exporting

    exporting.export_command(args, "lrcn")


def main(argv=None, args=None):
    """Runs a command: ``argv`` (default: ``sys.argv[1:]``) or already parsed ``args``."""
    return cli.run(args or parse_args(argv), {"train": train, "evaluate": evaluate, "predict": predict,
                                               "export": export})


if __name__ == "__main__":
    sys.exit(main(args=ARGS))
