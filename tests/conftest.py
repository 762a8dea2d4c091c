"""Shared fixtures: tiny trees of real files written in tmp_path: JPEGs in class folders, a raw Tiny
ImageNet download, captioned photos (Flickr8k and COCO layouts), frame folders and AVI videos."""

import collections
import contextlib
import gc
import importlib.abc
import json
import os
import sys
import zlib
from pathlib import Path

# XLA's optimisation passes off in the JAX runs (this process, the run beside it and the processes
# tests start), before anything imports JAX: the tests' tiny models compile for one or two steps, so
# compiling dominates, and JAX's flag is meant for this ("useful if the cost of optimization is
# greater than that of running a less-optimized program"). The same programs, run unoptimised.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import cv2
import numpy as np
import pytest
from PIL import Image

from helpers.captions import FLICKR8K_SPLITS, FLICKR8K_TOKENS

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
BACKEND = os.environ.get("KERAS_BACKEND", "tensorflow")

# JAX's persistent compilation cache in a folder of this session's own (shared with the run beside
# it and every JAX process the tests start, removed at the end): many tests compile the same tiny
# models, and a hit is the same XLA executable without the minutes of compiling. Never a folder
# that outlives the session, so each run of the suite pays its own compiles.
JAX_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    JAX_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="pytest-jax-cache-")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


class NoTensorFlow(importlib.abc.MetaPathFinder):
    """Makes ``import tensorflow`` fail, as in an environment without it (``requirements-jax.txt``):
    the suite under ``KERAS_BACKEND=jax`` runs as users of that environment do, and any import of
    TensorFlow by the project is an error (``test_backends.py`` checks none happened)."""

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("tensorflow", "tf_keras", "tensorboard"):
            raise ModuleNotFoundError(f"No module named {name!r} (the {BACKEND} test run has no TensorFlow)")
        return None


if BACKEND != "tensorflow":
    sys.meta_path.insert(0, NoTensorFlow())


# ---------------------------------------------------------------- both backends in one command
# `python -m pytest` on the default backend (TensorFlow) also runs the same selection of tests on each
# other backend of TEST_BACKENDS (default "tensorflow,jax"; JAX when it is installed), in a child
# process started at once and run beside this one, TensorFlow hidden from it. Its failures fail the
# session; its summary line is printed at the end. TEST_BACKENDS=tensorflow runs TensorFlow alone.
# The child has TEST_BESIDE set: a test that starts its own processes on each backend runs once.
# Under pytest-xdist (pytest.ini: 2 workers) the controller starts the child, never a worker, and
# the child runs its tests in 2 workers of its own.
OTHER_RUNS = {}


def _installed(backend_name):
    import importlib.util

    return importlib.util.find_spec({"jax": "jax", "torch": "torch"}.get(backend_name, backend_name)) is not None


def lower_priority():
    """Run in the child before it starts: nice 5 where the system has it (POSIX)."""
    if hasattr(os, "nice"):
        os.nice(5)


def pytest_configure(config):
    backends = [b.strip() for b in os.environ.get("TEST_BACKENDS", "tensorflow,jax").split(",") if b.strip()]
    if BACKEND != "tensorflow" or hasattr(config, "workerinput") or config.option.collectonly:
        return
    import subprocess
    import tempfile

    for other in backends:
        if other == BACKEND:
            continue
        if not _installed(other):
            OTHER_RUNS[other] = None  # reported as not run
            continue
        log = tempfile.NamedTemporaryFile("w+", prefix=f"pytest-{other}-", suffix=".log", delete=False)
        env = dict(os.environ, KERAS_BACKEND=other, TEST_BACKENDS=other, TEST_BESIDE=BACKEND)
        command = [sys.executable, "-m", "pytest", *config.invocation_params.args]
        # At a lower priority (nice 5): the TensorFlow run has more to do, and the run beside it fills
        # the cores whenever the TensorFlow run leaves one idle, so that both end together.
        OTHER_RUNS[other] = (subprocess.Popen(command, cwd=config.invocation_params.dir, env=env, stdout=log,
                                              stderr=subprocess.STDOUT, preexec_fn=lower_priority), log)


def pytest_sessionfinish(session, exitstatus):
    # After the session pytest collects garbage five times over to report any exception raised in a
    # __del__; each full collection walks every object the session's models left (seconds per
    # process). Collected once here, while that report still listens, then frozen: those five are
    # then quick, and the same garbage was collected.
    gc.collect()
    gc.freeze()
    failed = False
    for other, run in OTHER_RUNS.items():
        if run is not None and run[0].wait() not in (0, 5):  # 5: nothing selected on that backend
            failed = True
    if failed and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    if JAX_CACHE is not None:
        import shutil

        shutil.rmtree(JAX_CACHE, ignore_errors=True)


def pytest_terminal_summary(terminalreporter):
    for other, run in OTHER_RUNS.items():
        if run is None:
            terminalreporter.write_line(f"{other}: not run ({other} is not installed: pip install -r "
                                        f"requirements-{other}.txt)", yellow=True)
            continue
        process, log = run
        log.seek(0)
        lines = log.read().rstrip().splitlines()
        ok = process.returncode in (0, 5)
        if not ok:  # its failures, as it reported them
            start = next((i for i, line in enumerate(lines) if "= FAILURES =" in line or "= ERRORS =" in line), 0)
            terminalreporter.section(f"the same tests on {other}", sep="=", red=True)
            for line in lines[start:]:
                terminalreporter.write_line(line)
        durations = next((i for i, line in enumerate(lines) if "slowest" in line and "durations" in line), None)
        if durations is not None:  # what --durations printed there
            end = next((i for i in range(durations + 1, len(lines)) if not lines[i].strip() or
                        lines[i].startswith("=")), len(lines))
            terminalreporter.section(f"{other}: {lines[durations].strip('= ')}", sep="=")
            for line in lines[durations + 1:end]:
                terminalreporter.write_line(line)
        terminalreporter.write_line(f"{other}: {lines[-1].strip('= ') if lines else 'no output'}",
                                    green=ok, red=not ok)
        log.close()
        os.unlink(log.name)


def jax_run_beside():
    """Whether a JAX run of the tests goes on beside this TensorFlow one (``pytest_configure``)."""
    backends = os.environ.get("TEST_BACKENDS", "tensorflow,jax").split(",")
    return BACKEND == "tensorflow" and "jax" in [b.strip() for b in backends] and _installed("jax")


def tensorflow_run_beside():
    """Whether this run is the other backend's run beside a TensorFlow one (``pytest_configure``)."""
    return os.environ.get("TEST_BESIDE") == "tensorflow" and BACKEND != "tensorflow"


def pytest_collection_modifyitems(config, items):
    """Tests marked ``tensorflow`` (what TensorFlow alone does: tf.data, FusedLSTM's kernels,
    tf.distribute, SavedModel export) are skipped on the other backends. Tests marked
    ``jax_processes`` (they start JAX processes of their own and need nothing of this one's
    backend) run once: in the JAX run, or in the TensorFlow run when no JAX run is beside it.
    Tests marked ``backend_independent`` (text and the METEOR scorer: nothing of Keras's backend)
    run once: in the TensorFlow run, or in whichever run is alone. Tests marked ``heavy`` run first."""
    for item in items:
        if "backend_independent" in item.keywords and tensorflow_run_beside():
            item.add_marker(pytest.mark.skip(reason="needs no backend: the TensorFlow run beside this one runs it"))
            continue
        if "jax_processes" in item.keywords:
            if not _installed("jax"):
                item.add_marker(pytest.mark.skip(reason="JAX is not installed"))
            elif jax_run_beside():
                item.add_marker(pytest.mark.skip(reason="the JAX run beside this one runs it"))
            continue
        if "tensorflow" in item.keywords and BACKEND != "tensorflow":
            item.add_marker(pytest.mark.skip(reason=f"needs TensorFlow; this run is on {BACKEND}"))
    # The tests marked heavy first, the rest as collected: the workers take tests in this order as
    # they free up, so what is left at the end is short and both finish together.
    items.sort(key=lambda item: "heavy" not in item.keywords)


@pytest.fixture(autouse=True, scope="session")
def meteor_in_the_tensorflow_run_only():
    """METEOR is a Java program scoring caption strings: nothing of the backend reaches it. The
    TensorFlow run scores it (its ``backend_independent`` tests and its whole runs' evaluations);
    the run beside it does not start a second Java scorer (about 14 CPU-seconds): there,
    ``caption_scores`` reports METEOR as not computed, as it does where Java is missing."""
    if not tensorflow_run_beside():
        yield
        return
    from helpers import captions

    def elsewhere():
        raise OSError("METEOR is scored by the TensorFlow run beside this one")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(captions, "_meteor", elsewhere)
        yield


SHARED = Path(__file__).resolve().parents[1].parent / "shared"


# The classifier at the smallest size Xception takes: builder keywords, command-line flags.
CLASSIFIER_TINY = dict(image_size=71, rnn_timesteps=71, rnn_units=8, weights=None)
CLASSIFIER_FLAGS = ["--weights", "none", "--image-size", "71", "--rnn-timesteps", "71", "--rnn-units", "8",
                    "--batch-size", "3", "--fine-tune-batch-size", "3"]


def classifier_train_args(data, out, *extra):
    """``cnn_rnn_classifier.py train`` arguments for a tiny run on ``data`` into ``out``."""
    return ["--data-dir", str(data), "--output-dir", str(out), *CLASSIFIER_FLAGS, *extra]


def write_jpeg(path, seed, size=16, mode="RGB"):
    """Writes a real JPEG: smooth colour gradients plus noise, in RGB, L (grayscale) or CMYK."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, size)
    base = np.stack([np.outer(ramp, ramp), np.outer(ramp, 1 - ramp), np.outer(1 - ramp, ramp)], axis=-1)
    pixels = np.clip(255 * base * rng.uniform(0.5, 1.0, 3) + rng.normal(0, 20, base.shape), 0, 255)
    image = Image.fromarray(pixels.astype(np.uint8), "RGB")
    if mode != "RGB":
        image = image.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="JPEG", quality=90)
    return path


def make_tiny_imagenet(root, wnids=("n001", "n002", "n003"), train_per_class=6, val_per_class=2, test=3):
    """A raw Tiny ImageNet download in miniature, with grayscale and CMYK images and stray files."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "wnids.txt").write_text("".join(f"{w}\n" for w in wnids))
    (root / "words.txt").write_text("".join(f"{w}\tthing {i}\n" for i, w in enumerate(wnids)))
    seed = 0
    for w in wnids:
        for i in range(train_per_class):
            mode = ("RGB", "L", "CMYK")[i % 3]
            write_jpeg(root / "train" / w / "images" / f"{w}_{i}.JPEG", seed, mode=mode)
            seed += 1
        (root / "train" / w / f"{w}_boxes.txt").write_text("".join(f"{w}_{i}.JPEG\t0\t0\t9\t9\n" for i in range(train_per_class)))
    rows = []
    for i in range(val_per_class * len(wnids)):
        write_jpeg(root / "val" / "images" / f"val_{i}.JPEG", seed)
        seed += 1
        rows.append(f"val_{i}.JPEG\t{wnids[i % len(wnids)]}\t0\t0\t9\t9\n")
    (root / "val" / "val_annotations.txt").write_text("".join(rows))
    for i in range(test):
        write_jpeg(root / "test" / "images" / f"test_{i}.JPEG", seed)
        seed += 1
    (root / "train" / ".DS_Store").write_bytes(b"\0")
    (root / "val" / "images" / "Thumbs.db").write_bytes(b"\0")
    return root


def make_class_folders(root, classes=("cat", "dog", "fox"), per_class=(6, 3, 3), size=16):
    """train/ val/ test/ class folders of real JPEGs; every third image grayscale or CMYK."""
    root = Path(root)
    seed = 100
    for split, count in zip(("train", "val", "test"), per_class):
        for c_index, name in enumerate(classes):
            for i in range(count):
                mode = ("RGB", "L", "CMYK")[(i + c_index) % 3]
                write_jpeg(root / split / name / f"{name}_{i}.jpg", seed, size=size, mode=mode)
                seed += 1
    return root


COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}


def write_photo(path, colour, seed, size=72):
    rng = np.random.default_rng(seed)
    pixels = np.clip(rng.normal(COLOURS[colour], 25, (size, size, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="JPEG", quality=90)
    return path


def colour_captions(colour):
    return [f"A {colour} picture .", f"a {colour} image", f"The {colour} picture!", f"a {colour} square picture",
            f"a very {colour} image"]


def make_flickr8k(root, counts=(9, 3, 3), images="Flicker8k_Dataset"):
    """Flickr8k's layout in miniature: token file, the three split files, an images folder."""
    root = Path(root)
    lines, names, n = [], {}, 0
    for split, count in zip(FLICKR8K_SPLITS.values(), counts):
        names[split] = []
        for _ in range(count):
            colour = list(COLOURS)[n % 3]
            name = f"{1000 + n}_{colour}.jpg"
            write_photo(root / images / name, colour, n)
            lines += [f"{name}#{k}\t{text}" for k, text in enumerate(colour_captions(colour))]
            names[split].append(name)
            n += 1
    (root / FLICKR8K_TOKENS).write_text("\n".join(lines) + "\n")
    for split, listed in names.items():
        (root / split).write_text("\n".join(listed) + "\n")
    return root


def make_coco(root, with_test=False):
    root = Path(root)
    splits = (("train2017", 6), ("val2017", 3)) + ((("test2017", 3),) if with_test else ())
    for number, (split, count) in enumerate(splits):
        images, annotations = [], []
        for i in range(count):
            colour = list(COLOURS)[i % 3]
            write_photo(root / split / f"{i:012d}.jpg", colour, 100 * number + i)  # no photo in two splits
            images.append({"id": i, "file_name": f"{i:012d}.jpg"})
            annotations += [{"id": 10 * i + k, "image_id": i, "caption": text}
                            for k, text in enumerate(colour_captions(colour)[:3])]
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"captions_{split}.json").write_text(
            json.dumps({"images": images, "annotations": annotations}))
    return root


def make_clips(root, layout="class_folders", lengths=(3, 5, 4, 6), classes=("a", "b")):
    """Sample folders of real JPEG frames in either layout; frame names sort naturally, not lexically.
    The frames' seeds start from the folder's name, so no clip of one split is a clip of another."""
    seed = zlib.crc32(Path(root).name.encode()) % 100_000
    for c_index, name in enumerate(classes):
        for s_index, length in enumerate(lengths):
            folder = (root / name / f"s{s_index}") if layout == "class_folders" else (root / f"{c_index + 1}_s{s_index}")
            for t in range(length):
                write_jpeg(folder / f"frame_{t}.jpg", seed, size=12)
                seed += 1
    return root


def write_video(path, frames=12, size=(40, 32)):
    """A real MJPG-encoded AVI whose frame t is a bar at column 3t (so order can be checked)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, size)
    for t in range(frames):
        frame = np.zeros((size[1], size[0], 3), np.uint8)
        frame[:, 3 * t:3 * t + 3] = (0, 0, 255)  # red in BGR
        writer.write(frame)
    writer.release()
    return path


class Killed(BaseException):
    """Stands for the process being killed: not an Exception, so nothing catches it."""


def kill_at_batch(monkeypatch, batch_number):
    """Makes training raise ``Killed`` at the end of its ``batch_number``-th batch (1-based, over all epochs)."""
    import keras

    batches = {"n": 0}

    def on_train_batch_end(self, batch, logs=None):
        batches["n"] += 1
        if batches["n"] == batch_number:
            raise Killed()

    monkeypatch.setattr(keras.callbacks.CSVLogger, "on_train_batch_end", on_train_batch_end, raising=False)


def file_times(folder):
    """``{name: st_mtime_ns}`` of the files in ``folder`` (its lock left out): what a refused
    command must leave as it was."""
    from helpers import rundir

    return {p.name: p.stat().st_mtime_ns for p in Path(folder).iterdir() if p.is_file() and p.name != rundir.LOCK}


@contextlib.contextmanager
def weights_never_drawn():
    """Models built inside get variables with shapes but no values (a ``keras.StatelessScope`` that
    never initializes them): for tests of the shapes, counts and names of the seed-size models,
    whose millions of weights would take up to a minute to draw. On leaving, ``clear_session``
    forgets those variables (a later StatelessScope would otherwise draw them)."""
    import keras

    try:
        with keras.StatelessScope(initialize_variables=False):
            yield
    finally:
        keras.utils.clear_session()


@pytest.fixture
def tiny_imagenet(tmp_path):
    return make_tiny_imagenet(tmp_path / "raw")


@pytest.fixture
def class_folders(tmp_path):
    return make_class_folders(tmp_path / "data")


def stand_in_backbone(spec):
    """A five-layer stand-in for ``spec.constructor()`` (``helpers.backbones.Backbone``): the same
    name, call signature (``include_top``, ``weights``, ``input_shape``, ``pooling``) and output
    channels, a BatchNormalization inside (frozen in inference mode as the real one's are), a
    feature map about 1/32 of the input (71 px: 2 x 2; 32 px: 1 x 1); weights from a file of its
    own saved weights. For tests of the training core, where Xception's or VGG16's depth costs
    minutes of graph building and says nothing."""
    import keras

    def build(include_top=False, weights=None, input_shape=None, pooling=None, **kwargs):
        inputs = keras.Input(input_shape)
        x = keras.layers.Conv2D(8, 3, strides=4, name="block1_conv1")(inputs)
        x = keras.layers.BatchNormalization(name="block1_conv1_bn")(x)
        x = keras.layers.Activation("relu", name="block1_conv1_act")(x)
        x = keras.layers.AveragePooling2D(8, name="block1_pool")(x)
        x = keras.layers.Conv2D(spec.features, 1, name="block2_conv1")(x)
        if pooling == "avg":
            x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
        model = keras.Model(inputs, x, name=spec.name)
        if weights == "imagenet":
            raise Exception("URL fetch failure: the test stand-in has no ImageNet weights")
        if weights is not None:
            model.load_weights(weights)
        return model

    build.__name__ = spec.application
    return build


TrainedRun = collections.namedtuple("TrainedRun", "data run argv log")


@pytest.fixture(scope="session")
def trained_classifier(tmp_path_factory):
    """A finished tiny classifier run, trained once per session (stand-in backbone, one epoch of
    phase 1 on cached features, no phase 2) for the tests that need a run rather than training:
    a ``TrainedRun``: ``data``, its class folders (read only); ``run``, its folder
    (``shutil.copytree`` it before changing it); ``argv(out)``, the ``train`` arguments that made
    it with ``--output-dir out``; ``log``, what it logged (INFO and above)."""
    import logging.handlers

    import cnn_rnn_classifier

    root = tmp_path_factory.mktemp("trained_classifier")
    data, run = make_class_folders(root / "data"), root / "run"

    def argv(out):
        return classifier_train_args(data, out, "--epochs", "1", "--fine-tune-epochs", "0", "--skip-image-check")

    lines, root_logger = logging.handlers.BufferingHandler(capacity=100_000), logging.getLogger()
    lines.setLevel(logging.INFO)
    level = root_logger.level
    root_logger.addHandler(lines)
    root_logger.setLevel(logging.INFO)
    try:
        with stand_in_backbones_patched():
            assert cnn_rnn_classifier.main(argv(run)) == 0
    finally:
        root_logger.removeHandler(lines)
        root_logger.setLevel(level)
    return TrainedRun(data, run, argv, "\n".join(record.getMessage() for record in lines.buffer))


@contextlib.contextmanager
def stand_in_backbones_patched():
    """Inside, every script builds ``stand_in_backbone``s in place of Xception and VGG16 (a patch of
    its own, which a test's ``monkeypatch.undo()`` leaves in place); for fixtures of any scope."""
    from helpers import backbones

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(backbones.Backbone, "constructor", stand_in_backbone)
        yield


@pytest.fixture
def stand_in_backbones():
    """``stand_in_backbones_patched`` for one test."""
    with stand_in_backbones_patched():
        yield
