"""Backbone features computed once and cached on disk, for phases whose backbone is frozen.

While a backbone is frozen (and the images are not augmented), it maps each image to the
same features in every epoch, so a phase can train the layers above it from the cached
features instead of running the backbone again. The cache is one ``.npy`` array
``(num_images, features)`` (float32; or float16 for a feature grid) per image list, in the run's ``features/`` folder
(``rundir.RunDir.features``), named ``<name>-<key>.npy``. The key is a SHA-256 of
everything the features depend on: the encoder's weights (ImageNet, random or a file's
weights all give other keys), its input size, the dtype policies its layers compute with (a
bfloat16 backbone gives another key), and each image file's path, size and modification time. A rerun with the same
key reads the file; any change computes it again and replaces the old one. Files are
written atomically (``rundir.write_atomically``).
"""

import hashlib
import logging
import os
from pathlib import Path

import keras
import numpy as np

from helpers import backend, data, distribute, precision, rundir
from helpers.training import progress_verbosity

logger = logging.getLogger(__name__)

READER = "read_rgb: PIL, EXIF orientation, RGB, bilinear"  # part of every key: a new reader computes again


def tf_read_rgb(path, image_size):
    """``helpers.data.read_rgb`` as a ``tf.data`` operation: the project's one image reader
    (PIL, EXIF orientation applied, RGB, bilinear resize), in a ``tf.numpy_function``.

    Args:
        path: a scalar ``tf.string`` tensor, the file's path as bytes (any file name).
        image_size: output height and width in pixels.

    Returns:
        ``(image_size, image_size, 3)`` float32 RGB 0..255.
    """
    import tensorflow as tf

    def read(name):
        return data.read_rgb(os.fsdecode(np.asarray(name).item()), image_size)

    image = tf.numpy_function(read, [path], tf.float32, stateful=False)
    image.set_shape((image_size, image_size, 3))
    return image


class ImageBatches(keras.utils.PyDataset):
    """Image files in batches, in order, read by ``helpers.data.read_rgb`` (any backend).

    Args:
        paths: image files.
        image_size: output height and width in pixels.
        batch_size: images per batch; the last batch may be smaller.
        workers: threads reading batches (``keras.utils.PyDataset``).

    Batches: ``(batch, image_size, image_size, 3)`` float32 RGB 0..255.
    """

    def __init__(self, paths, image_size, batch_size, workers=2):
        super().__init__(workers=workers)
        self.paths, self.image_size, self.batch_size = list(paths), image_size, batch_size

    def __len__(self):
        return -(-len(self.paths) // self.batch_size)

    def __getitem__(self, index):
        chunk = self.paths[index * self.batch_size:(index + 1) * self.batch_size]
        return np.stack([data.read_rgb(path, self.image_size) for path in chunk])


def cache_key(encoder, paths, reader=""):
    """The SHA-256 (hex) of the encoder's weights, input shape and the dtype policies of the layers
    that compute (nested and wrapped ones included), of the image reader's name, and of each file's
    path, size and modification time: the same for a model and its saved and loaded copy.

    Nested models and input layers are left out of the policies: they only hand tensors on (each
    layer casts its own inputs), and ``keras.saving.load_model`` gives them the float32 policy back
    whatever they were built with (a backbone built under ``mixed_bfloat16`` comes back with
    ``float32`` on its container and input layer, the same policies inside)."""
    policies = [layer.dtype_policy.name for layer in precision.all_layers(encoder)
                if not isinstance(layer, (keras.Model, keras.layers.InputLayer))]
    digest = hashlib.sha256()
    digest.update(repr((tuple(encoder.input_shape), policies, reader, READER)).encode())
    for variable in encoder.weights:
        digest.update(np.ascontiguousarray(variable.numpy()).tobytes())
    for path in paths:
        stat = os.stat(path)
        digest.update(f"{Path(path).resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def cached_features(encoder, paths, folder, name, batch_size=32, workers=2, loader=None,
                    images=None, reader=None, dtype="float32", strategy=None):
    """The encoder's output for every image of ``paths``, from the cache or computed (then cached).

    Args:
        encoder: a ``keras.Model`` from ``(batch, size, size, 3)`` RGB 0..255 images to
            ``(batch, features)`` (or ``(batch, positions, features)``, a feature grid); frozen.
        paths: image files.
        folder: the cache folder (``RunDir.features``).
        name: the image list's name in the file name (``"train"``).
        batch_size: images per encoder call.
        loader: ``loader(paths) -> (len(paths), size, size, 3)`` float32 RGB 0..255: the images
            exactly as the uncached path reads them (LRCN: PIL); default: ``ImageBatches``.
        images: instead of ``loader``: ``images()`` returns the encoder's inputs for ``paths`` in
            order, as anything ``encoder.predict`` takes (the classifier: its training input
            path without shuffling), read by ``reader``; called only when the cache misses.
        reader: the name of the image reader, part of the key (default: ``loader``'s name).
        dtype: the stored dtype: ``"float32"``, or ``"float16"`` for large feature grids (half
            the disk and memory; relative error below 1e-3), part of the key.
        strategy: under several JAX processes (``helpers.distribute.ProcessDataParallel``), each
            process reads and encodes its share of ``paths`` and every process gets every row
            (``distribute.shared_rows``; the default reader only), then caches them in its own folder.

    Returns:
        ``(len(paths), *features)`` numpy array of ``dtype``.
    """
    folder = Path(folder)
    if reader is None:
        reader = "" if loader is None else f"{loader.__module__}.{loader.__qualname__}"
    key = cache_key(encoder, paths, reader + ("" if dtype == "float32" else f" as {dtype}"))[:20]
    path = folder / f"{name}-{key}.npy"
    features = None
    if path.is_file():
        try:
            features = np.load(path, mmap_mode=None, allow_pickle=False)
            if features.shape[0] != len(paths):
                features = None
        except (OSError, ValueError) as error:  # a damaged file is computed again
            logger.warning("feature cache %s is unreadable (%s); computing it again", path, error)
    # several processes compute together: each reads its cache only when every one of them can
    if distribute.everywhere(strategy, features is not None):
        logger.info("features of %d %s images read from the cache %s", len(paths), name, path)
        return features
    logger.info("computing the backbone features of %d %s images once (cached in %s)", len(paths), name, path)
    size = encoder.input_shape[1]
    if distribute.process_count(strategy) > 1:
        predict = distribute.local_predictor(encoder)

        def share(first, stop):  # this process's images, read and encoded
            chunks = [paths[i:min(i + batch_size, stop)] for i in range(first, stop, batch_size)]
            return np.concatenate([predict(np.stack([data.read_rgb(path, size) for path in chunk]))
                                   for chunk in chunks])

        features = distribute.shared_rows(strategy, len(paths), encoder.output_shape[1:], dtype, share)
    elif images is not None:
        features = np.asarray(encoder.predict(images(), verbose=progress_verbosity()), dtype)
    elif loader is None:  # chunk by chunk into the stored dtype: a float16 grid never exists in float32 whole
        features = np.empty((len(paths), *encoder.output_shape[1:]), dtype)
        chunk = batch_size * 32
        for first in range(0, len(paths), chunk):
            features[first:first + chunk] = encoder.predict(
                ImageBatches(paths[first:first + chunk], size, batch_size, workers=workers),
                verbose=progress_verbosity())
    else:
        features = np.concatenate([np.asarray(encoder.predict(loader(paths[i:i + batch_size]), verbose=0), dtype)
                                   for i in range(0, len(paths), batch_size)])
    for stale in folder.glob(f"{name}-*.npy"):
        stale.unlink(missing_ok=True)
    rundir.write_atomically(path, lambda partial: np.save(partial, features, allow_pickle=False))
    logger.info("feature cache %s: %.1f MB on disk", path, path.stat().st_size / 1e6)
    return features


def array_batches(inputs, labels, batch_size, shuffle=False, seed=0):
    """In-memory arrays (cached features) in batches of ``(inputs, labels)``, reshuffled every
    epoch when ``shuffle``: a ``tf.data.Dataset`` where TensorFlow is the backend (the path the
    project's TensorFlow figures were measured with), an ``ArrayBatches`` on the others.

    Args:
        inputs: an array, or a tuple of arrays, with one row per example.
        labels: an array with one row per example.
        batch_size: examples per batch; the last batch may be smaller.
        shuffle: a new order every epoch.
        seed: the shuffling seed.
    """
    if backend.is_tensorflow():
        import tensorflow as tf

        dataset = tf.data.Dataset.from_tensor_slices((inputs, labels))
        if shuffle:
            dataset = dataset.shuffle(len(labels), seed=seed, reshuffle_each_iteration=True)
        return dataset.batch(batch_size).prefetch(2)
    return ArrayBatches(inputs, labels, batch_size, shuffle, seed)


class ArrayBatches(keras.utils.PyDataset):
    """``array_batches`` as a ``keras.utils.PyDataset`` (any backend): batch ``i`` holds the rows
    ``order[i * batch_size:(i + 1) * batch_size]``, the order drawn anew after every epoch when
    ``shuffle`` (``numpy.random.default_rng(seed)``)."""

    def __init__(self, inputs, labels, batch_size, shuffle=False, seed=0):
        super().__init__()
        self.inputs, self.labels, self.batch_size, self.shuffle = inputs, np.asarray(labels), batch_size, shuffle
        self.rng = np.random.default_rng(seed)
        self.order = self.rng.permutation(len(self.labels)) if shuffle else np.arange(len(self.labels))

    def __len__(self):
        return -(-len(self.labels) // self.batch_size)

    def __getitem__(self, index):
        rows = self.order[index * self.batch_size:(index + 1) * self.batch_size]
        return keras.tree.map_structure(lambda array: np.asarray(array)[rows], self.inputs), self.labels[rows]

    def on_epoch_end(self):
        if self.shuffle:
            self.order = self.rng.permutation(len(self.labels))


def phase1_on_cache(trainer, backbone, unit, epochs, feature_cache=True, augment=False, distribute="none", off=()):
    """Whether phase 1 trains on cached backbone features (the backbone is frozen, so each
    image's or frame's features are the same in every epoch), logging why not when a flag
    rules the cache out.

    Args:
        trainer: the run's ``helpers.training.Trainer`` (whether phase 1 is complete: in every
            process of a multi-process run).
        backbone: the backbone's name for the log (``"Xception"``, ``"VGG16"``).
        unit: what the backbone reads (``"image"``, ``"frame"``).
        epochs: phase 1's epochs (``--epochs``).
        feature_cache, augment, distribute: ``--no-feature-cache`` (False), ``--augment``,
            ``--distribute``, where the script has them.
        off: more ``(condition, reason)`` pairs that rule the cache out.

    Returns:
        False when phase 1 does not train (0 epochs, or already complete) or a flag rules the
        cache out; True otherwise.
    """
    if not epochs or trainer.phase_complete("phase1"):
        return False
    reasons = [reason for condition, reason in (
        (not feature_cache, "--no-feature-cache"), *off,
        (augment, f"--augment (each epoch's {unit}s differ)"),
        (distribute != "none", "--distribute; on one device --distribute none keeps it"),
    ) if condition]
    if reasons:
        logger.info("phase 1: %s runs on every %s every epoch (feature cache off: %s)", backbone, unit,
                    ", ".join(reasons))
    return not reasons
