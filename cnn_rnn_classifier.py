#!/usr/bin/env python
"""Image classifier with parallel CNN and RNN branches, trained in two phases.

Source: the seed write-ups ``000_*.txt`` / ``001_*.txt`` ("a practical example on
how to combine both a CNN and a RNN to classify images"), which reported 96.14%
top-5 accuracy on tiny-imagenet-100, measured on the validation split that also
chose the checkpoint.

    image (299, 299, 3), Xception-preprocessed to [-1, 1]
      |-- Xception (ImageNet) + global average pooling ------------> (2048,)
      |-- grayscale -> (23, 3887) timesteps -> LSTM(2048) -> LSTM(2048) -> (2048,)
      '-- element-wise product -> Dense(num_classes, softmax)

Phase 1 trains the RNN branch and the classifier with Xception frozen (RMSprop),
from each image's Xception features computed once and cached (``phase1_inputs``);
phase 2 fine-tunes everything (or Xception's top ``--fine-tune-layers``) with
Adam(1e-4), starting from phase 1's best checkpoint. Images are read by ``CustomImageDataGenerator.flow_from_directory``,
whose ``standardize()`` applies Xception's preprocessing, as in the seed.

Usage::

    python cnn_rnn_classifier.py [train] --data-dir DATA --output-dir runs/x [--weights imagenet|none|PATH]
    python cnn_rnn_classifier.py evaluate --model runs/x/phase2_best.keras --data-dir DATA [--json FILE]
    python cnn_rnn_classifier.py predict --model runs/x/phase2_best.keras [--top-k 5] IMAGE_OR_DIR...
    python cnn_rnn_classifier.py export --model runs/x/phase2_best.keras --output DIR [--format saved_model|tflite]

In Python, ``classify(model_or_path, images, top_k=5)`` returns what ``predict`` prints.

A saved model loads in safe mode with ``keras.saving.load_model(path)`` once this
module (or ``helpers.layers``) has been imported.
"""

import functools
import logging
import os
import sys

from helpers import cli
from helpers.backbones import XCEPTION




def parse_args(argv=None):
    parser, train_parser, evaluate_parser, predict_parser, export_parser = cli.parser_with_commands(
        "Xception + LSTM image classifier (seed 000/001), trained in two phases."
    )
    cli.add_data_arguments(train_parser)
    model = train_parser.add_argument_group("model")
    cli.add_backbone_arguments(model, XCEPTION, image_size=299, fine_tune_layers=None,
                               layer_examples="6: block 14, 16: blocks 13-14, 46: blocks 10-14; all, as the seed")
    model.add_argument("--rnn-timesteps", type=int, default=23,
                       help="timesteps the grayscale image is cut into; must divide image-size**2 (default: 23)")
    model.add_argument("--rnn-units", type=int, default=2048,
                       help="units of both LSTMs; other than 2048 adds a projection of the CNN features "
                       "(default: 2048)")
    train_parser.add_argument("--input", choices=("generator", "tf.data"), default="generator",
                              help="input path: the seed's CustomImageDataGenerator (any backend), or tf.data with "
                              "parallel reads and prefetch, for a GPU (needs TensorFlow installed) (default: generator)")
    model.add_argument("--cnn-only", action="store_true",
                       help="ablation: train the CNN branch alone, same classifier, no RNN branch (default: off)")
    train_parser.add_argument("--augment", action="store_true",
                              help="random horizontal flips, shifts and zoom of up to 10%% of the training images "
                              "(ImageDataGenerator's horizontal_flip, width/height_shift_range, zoom_range; the same "
                              "ranges in the tf.data path); turns the feature cache off (default: off, as the seed)")
    training_group = cli.add_training_arguments(train_parser)
    cli.add_feature_cache_argument(training_group, "Xception", "image",
                                   "Xception is frozen, --augment is off and --distribute is none")
    cli.add_performance_arguments(train_parser)
    cli.add_output_arguments(train_parser)

    cli.add_evaluate_arguments(evaluate_parser, batch_size=32)

    predict_parser.add_argument("--batch-size", type=int, default=32, help="batch size (default: 32)")
    cli.add_predict_arguments(predict_parser, "image files or folders (searched recursively)")
    for command in (evaluate_parser, predict_parser, export_parser):
        cli.add_tta_argument(command)
    return parser.parse_args(cli.with_default_command(argv))


if __name__ == "__main__":
    ARGS = cli.parse_before_backend(parse_args)

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras.src.legacy.preprocessing.image import DirectoryIterator, ImageDataGenerator  # noqa: E402

from helpers import backend, data, distribute, features, multiworker, precision, reports, training  # noqa: E402
from helpers.backbones import pretrained_backbone  # noqa: E402
from helpers.features import tf_read_rgb  # noqa: E402
from helpers.errors import UsageError  # noqa: E402
from helpers.layers import ChannelMean, flip_averaged  # noqa: E402
from helpers.optimizers import FusedAdam  # noqa: E402
from helpers.recurrent import FusedLSTM  # noqa: E402

logger = logging.getLogger(__name__)

BACKBONE = XCEPTION.name
# The builder's keyword arguments that come from flags of the same name: passed from here
# (``cli.model_arguments``), and compared by the resume check.
MODEL_ARGUMENTS = ("image_size", "rnn_timesteps", "rnn_units", "cnn_only", "mixed_precision")


class CustomImageDataGenerator(ImageDataGenerator):
    """The seed's ``ImageDataGenerator`` whose ``standardize()`` applies Xception preprocessing.

    ``flow_from_directory`` calls ``standardize()`` on every image before it is
    batched. After the base class's own standardization (rescale, centring, ...,
    all off by default) the image goes through
    ``keras.applications.xception.preprocess_input``: 0..255 becomes -1..1.

    Output batches: ``(batch, height, width, 3)`` float32 in [-1, 1], and one-hot
    labels ``(batch, num_classes)`` float32. Grayscale and CMYK files are converted
    to RGB by the generator (``color_mode="rgb"``).

    Keras 3 ships this base class as ``tf.keras.preprocessing.image.ImageDataGenerator``, which is
    Keras' legacy numpy/Pillow class (imported from ``keras.src.legacy``, so it works on every
    backend without TensorFlow; deprecated, but its iterators are ``keras.utils.PyDataset``s that
    ``fit`` takes).
    """

    def standardize(self, x):
        """Args: x: one image ``(height, width, 3)`` float32, 0..255. Returns it in [-1, 1] (in place)."""
        return XCEPTION.preprocess_input(super().standardize(x))

    def flow_from_directory(self, directory, **kwargs):
        """``ImageDataGenerator.flow_from_directory`` (same arguments and listing) whose iterator
        reads each file with the project's image reader (``ImageReadingIterator``)."""
        return ImageReadingIterator(directory, self, **kwargs)


class ImageReadingIterator(DirectoryIterator):
    """Keras' ``DirectoryIterator`` reading each image with ``helpers.data.read_rgb``: the same
    pixels as Keras' ``load_img`` (PIL, RGB, bilinear resize), turned upright by the file's EXIF
    orientation as every other reader of the project does, and a 16-bit image refused by name.
    RGB, square targets and one-hot (``"categorical"``) labels only, as ``flow_from_split`` asks."""

    @property
    def row_count(self):
        """Images listed (``helpers.distribute.ProcessSlices``)."""
        return self.n

    def load_rows(self, rows):
        """The batch of the images ``rows`` (indices into ``filepaths``)."""
        return self._get_batches_of_transformed_samples(rows)

    def _get_batches_of_transformed_samples(self, index_array):
        generator, size = self.image_data_generator, self.target_size[0]
        images = np.zeros((len(index_array), *self.image_shape), self.dtype)
        for i, j in enumerate(index_array):
            image = data.read_rgb(self.filepaths[j], size)
            images[i] = generator.standardize(generator.apply_transform(image, generator.get_random_transform(
                image.shape)))
        labels = np.zeros((len(index_array), len(self.class_indices)), self.dtype)
        labels[np.arange(len(index_array)), self.classes[index_array]] = 1.0
        return images, labels


def check_model_arguments(num_classes, image_size, rnn_timesteps, rnn_units):
    """Raises ``UsageError`` (a ``ValueError``) echoing the first argument the model cannot be built with."""
    if num_classes < 2:
        raise UsageError(f"num_classes must be at least 2. Received: num_classes={num_classes}")
    XCEPTION.check_arguments(image_size=image_size)
    if rnn_timesteps < 1 or (image_size * image_size) % rnn_timesteps:
        raise UsageError(
            f"rnn_timesteps must divide image_size**2 = {image_size * image_size}. "
            f"Received: rnn_timesteps={rnn_timesteps}"
        )
    if rnn_units < 1:
        raise UsageError(f"rnn_units must be at least 1. Received: rnn_units={rnn_units}")


def build_cnn_rnn_classifier(
    num_classes=100, image_size=299, rnn_timesteps=23, rnn_units=2048, weights="imagenet", cnn_only=False,
    mixed_precision="off", fused_lstm=True,
):
    """Builds the two-branch CNN + RNN classifier of the seed.

    At the defaults the model has 103,256,716 parameters (Xception 20,861,480;
    the two LSTMs 82,190,336; the classifier 204,900).

    Args:
        num_classes: number of classes, at least 2.
        image_size: input height and width in pixels, at least 71 (Xception's minimum).
        rnn_timesteps: the grayscale image's ``image_size**2`` pixels are read as
            ``rnn_timesteps`` steps of ``image_size**2 // rnn_timesteps`` values
            (at the defaults 23 x 3887, as in the seed); must divide ``image_size**2``.
        rnn_units: units of both LSTMs. The seed's 2048 matches Xception's
            features; any other value adds a linear ``Dense(rnn_units)``
            projection of the CNN features (layer ``cnn_projection``) so that the
            element-wise product is defined. That keeps small configurations
            possible on a CPU.
        weights: Xception weights: ``"imagenet"`` (downloaded by Keras), ``None`` or
            ``"none"`` (random), or the path of a no-top Xception weights file.
        cnn_only: ablation: drop the RNN branch; the same softmax classifier reads
            the 2048 CNN features directly.
        mixed_precision: ``"off"`` (float32), ``"bfloat16"``, ``"float16"`` or
            ``"auto"`` (``helpers.precision.resolve``): the compute dtype of the
            Xception backbone. The LSTMs and the classifier keep float32 weights and
            outputs; with bfloat16 the LSTMs' matmuls read bfloat16 copies of their
            operands (``FusedLSTM``'s ``matmul_dtype``; states and gates float32), 2.2x
            faster on this project's AMX CPU (README, training throughput).
        fused_lstm: ``False`` builds plain ``keras.layers.LSTM`` layers (same weights and
            results, slower on a CPU): the seed-faithful baseline of the benchmarks.

    Returns:
        A functional ``keras.Model``. Input ``(batch, image_size, image_size, 3)``
        float32, Xception-preprocessed to [-1, 1]; output ``(batch, num_classes)``
        float32 softmax probabilities. The backbone is the nested layer ``"xception"``;
        the RNN layers are ``"rnn_lstm_1"`` and ``"rnn_lstm_2"``, ``helpers.recurrent.FusedLSTM``:
        ``keras.layers.LSTM`` with the same weights and results, faster to train on a CPU
        (cuDNN on a GPU; the README has the measurements).

    Raises:
        helpers.errors.UsageError: an argument is out of range (a ``ValueError``; the
            message echoes it).
        helpers.errors.MissingFileError: ``weights`` is a path that does not exist.
        helpers.backbones.WeightsUnavailableError: the ImageNet download failed;
            the message names the offline options.
    """
    check_model_arguments(num_classes, image_size, rnn_timesteps, rnn_units)
    inputs = keras.Input((image_size, image_size, 3), name="image")
    policy = precision.resolve(mixed_precision)
    backbone = pretrained_backbone(
        XCEPTION.constructor(), weights, policy, input_shape=(image_size, image_size, 3), pooling="avg",
    )
    head = {"predictions": keras.layers.Dense(num_classes, activation="softmax", name="predictions")}
    if not cnn_only:
        if fused_lstm:  # bfloat16 matmuls (float32 weights, states and gates) where the backbone is bfloat16
            lstm = functools.partial(FusedLSTM, matmul_dtype="bfloat16" if policy == "mixed_bfloat16" else None)
        else:
            lstm = keras.layers.LSTM
        head.update(
            grayscale=ChannelMean(name="grayscale"),  # (batch, size, size, 1)
            timesteps=keras.layers.Reshape((rnn_timesteps, image_size * image_size // rnn_timesteps), name="timesteps"),
            rnn_lstm_1=lstm(rnn_units, return_sequences=True, name="rnn_lstm_1"),
            rnn_lstm_2=lstm(rnn_units, name="rnn_lstm_2"),  # (batch, rnn_units)
            merge=keras.layers.Multiply(name="merge"),
        )
        if rnn_units != XCEPTION.features:
            head["cnn_projection"] = keras.layers.Dense(rnn_units, name="cnn_projection")
    outputs = _apply_head(head, backbone(inputs), inputs)  # Xception's features: (batch, 2048)
    return keras.Model(inputs, outputs, name="cnn_classifier" if cnn_only else "cnn_rnn_classifier")


HEAD_LAYERS = ("grayscale", "timesteps", "rnn_lstm_1", "rnn_lstm_2", "cnn_projection", "merge", "predictions")


def _apply_head(layers, features, image):
    """Calls the layers above Xception (``{name: layer}``, names from ``HEAD_LAYERS``; the RNN
    branch's are absent in a ``cnn_only`` model) on Xception's ``features`` and the ``image``."""
    if "rnn_lstm_1" in layers:
        steps = layers["timesteps"](layers["grayscale"](image))
        rnn_features = layers["rnn_lstm_2"](layers["rnn_lstm_1"](steps))
        if "cnn_projection" in layers:
            features = layers["cnn_projection"](features)
        features = layers["merge"]([features, rnn_features])
    return layers["predictions"](features)


def classifier_head(model):
    """Everything of a classifier above Xception, as a model of its own that shares ``model``'s layers.

    Phase 1 trains it on cached Xception features (``phase1_inputs``): training the head
    trains ``model``, whose Xception is frozen then.

    Args:
        model: a model from ``build_cnn_rnn_classifier``.

    Returns:
        A functional ``keras.Model`` named ``"classifier_head"``. Inputs: ``features``
        ``(batch, 2048)`` float32 (Xception's pooled output) and, unless the model is
        ``cnn_only``, ``image`` ``(batch, image_size, image_size, 3)`` float32 in [-1, 1]
        (for the RNN branch); output ``(batch, num_classes)`` float32 softmax probabilities.
    """
    layers = {layer.name: layer for layer in model.layers if layer.name in HEAD_LAYERS}
    features = keras.Input((XCEPTION.features,), name="features")
    if "rnn_lstm_1" not in layers:
        return keras.Model(features, _apply_head(layers, features, None), name="classifier_head")
    image = keras.Input(model.input_shape[1:], name="image")
    return keras.Model([features, image], _apply_head(layers, features, image), name="classifier_head")


# --augment: ImageDataGenerator's own arguments (the seed's generator path); the tf.data path
# applies the same ranges with Keras' preprocessing layers (``augmentation_layers``).
AUGMENTATION = {"horizontal_flip": True, "width_shift_range": 0.1, "height_shift_range": 0.1, "zoom_range": 0.1,
                "fill_mode": "nearest"}


def flow_from_split(split, image_size, batch_size, shuffle, seed=None, workers=1, features=None, augment=False):
    """``CustomImageDataGenerator().flow_from_directory`` over a checked ``data.Split``.

    Args:
        split: a ``data.Split``.
        image_size: output height and width in pixels.
        batch_size: images per batch; the last batch may be smaller.
        shuffle: reshuffle the images every epoch.
        seed: shuffling (and augmentation) seed.
        workers: threads building batches (``keras.utils.PyDataset.workers``).
        features: ``(len(split), 2048)`` float32 cached Xception features of the images, in
            ``split.paths`` order; each batch then carries its images' rows (``WithFeatures``).
        augment: random flips, shifts and zoom (``AUGMENTATION``), drawn per image and epoch.

    Returns:
        A ``keras.utils.PyDataset`` of ``(images, one_hot_labels)``: ``(batch, image_size,
        image_size, 3)`` float32 in [-1, 1] and ``(batch, num_classes)`` float32; with
        ``features``, ``((features, images), one_hot_labels)``.
    """
    iterator = CustomImageDataGenerator(**(AUGMENTATION if augment else {})).flow_from_directory(
        str(split.directory), target_size=(image_size, image_size), classes=split.class_names,
        class_mode="categorical", batch_size=batch_size, shuffle=shuffle, seed=seed, interpolation="bilinear",
    )
    if len(iterator.filepaths) != len(split):  # our listing mirrors Keras'; never expected
        raise data.DatasetError(f"{split.directory}: Keras found {len(iterator.filepaths)} images, we listed {len(split)}.")
    iterator.workers = workers
    return iterator if features is None else WithFeatures(iterator, features)


class WithFeatures(keras.utils.PyDataset):
    """A ``flow_from_directory`` iterator's batches, each with its images' cached features in front.

    The iterator keeps its own order and per-epoch shuffling; batch ``i`` is
    ``((features[rows], images), labels)`` for the rows of the images it holds.
    """

    def __init__(self, iterator, features):
        super().__init__(workers=iterator.workers)
        if len(features) != len(iterator.filepaths):
            raise ValueError(f"{len(features)} feature rows for {len(iterator.filepaths)} images")
        self.iterator, self.features = iterator, features

    def __len__(self):
        return len(self.iterator)

    def __getitem__(self, index):
        iterator = self.iterator
        if iterator.index_array is None:
            iterator._set_index_array()  # the rows of batch ``index``, as the iterator's __getitem__ takes them
        rows = iterator.index_array[index * iterator.batch_size:(index + 1) * iterator.batch_size]
        images, labels = iterator._get_batches_of_transformed_samples(rows)
        return (self.features[rows], images), labels

    def on_epoch_end(self):
        self.iterator.on_epoch_end()


def augmentation_layers(seed=None):
    """``AUGMENTATION`` as Keras preprocessing layers, for the tf.data path: a
    ``keras.Sequential`` on ``(height, width, 3)`` images (any value range)."""
    shift, zoom = AUGMENTATION["width_shift_range"], AUGMENTATION["zoom_range"]
    return keras.Sequential([
        keras.layers.RandomFlip("horizontal", seed=seed),
        keras.layers.RandomTranslation(shift, shift, fill_mode=AUGMENTATION["fill_mode"], seed=seed),
        keras.layers.RandomZoom((-zoom, zoom), (-zoom, zoom), fill_mode=AUGMENTATION["fill_mode"], seed=seed),
    ], name="augmentation")


def tf_data_batches(split, image_size, batch_size, shuffle, seed=None, workers=None, drop_remainder=False,
                  shard=None, features=None, augment=False):
    """The ``tf.data`` input path: parallel decoding, batching and prefetch.

    The same images, labels and preprocessing as the generator path: each file read by the
    project's image reader (``helpers.data.read_rgb`` in ``helpers.features.tf_read_rgb``: PIL,
    EXIF orientation, RGB, bilinear resize to ``image_size``), then Xception preprocessing.
    The file order is reshuffled every epoch when ``shuffle``.

    Args:
        split: a ``data.Split``.
        image_size: output height and width in pixels.
        batch_size: images per batch; the last batch may be smaller.
        shuffle: reshuffle the files every epoch.
        seed: shuffling seed.
        workers: parallel decode calls (``num_parallel_calls``); default ``tf.data.AUTOTUNE``.
        drop_remainder: leave out the last, partial batch (for several replicas).
        shard: ``(count, index)``: only every ``count``-th file from ``index`` (one
            worker's share, before decoding).
        features: ``(len(split), 2048)`` float32 cached Xception features, in
            ``split.paths`` order, carried with each image.
        augment: random flips, shifts and zoom (``augmentation_layers``), per image.

    Returns:
        A ``tf.data.Dataset`` of ``(images, one_hot_labels)``: ``(batch, image_size,
        image_size, 3)`` float32 in [-1, 1] and ``(batch, num_classes)`` float32; with
        ``features``, ``((features, images), one_hot_labels)``.

    Raises:
        helpers.errors.UsageError: TensorFlow is not installed (``tf.data`` is TensorFlow's).
    """
    backend.require_tensorflow("--input tf.data", backend=False)
    import tensorflow as tf

    workers = tf.data.AUTOTUNE if workers is None else workers
    num_classes = len(split.class_names)

    augmentation = augmentation_layers(seed) if augment else None

    def load(path, label, *cached):
        image = tf_read_rgb(path, image_size)
        if augmentation is not None:
            image = augmentation(image, training=True)
        image = XCEPTION.preprocess_input(image)
        return (cached[0], image) if cached else image, tf.one_hot(label, num_classes)

    # File names as bytes: a name that is not valid UTF-8 is read like any other.
    columns = ([os.fsencode(p) for p in split.paths], list(split.labels))
    dataset = tf.data.Dataset.from_tensor_slices(columns if features is None else (*columns, features))
    if shard:
        dataset = dataset.shard(*shard)
    if shuffle:
        dataset = dataset.shuffle(len(split), seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.map(load, num_parallel_calls=workers, deterministic=True)
    return dataset.batch(batch_size, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE)


def _sharded_input(splits, args, batch_size):
    """``(train, val)`` ``multiworker.ShardedInput``s for ``--distribute multi-worker`` (tf.data path only)."""

    def dataset_fn(training, context):
        dataset = tf_data_batches(splits["train" if training else "val"], args.image_size,
                                context.get_per_replica_batch_size(batch_size), shuffle=training, seed=args.seed,
                                workers=args.workers, drop_remainder=True, augment=training and args.augment,
                                shard=(context.num_input_pipelines, context.input_pipeline_id))
        return dataset.repeat() if training else dataset

    return multiworker.ShardedInput.train_and_val(dataset_fn, batch_size, len(splits["train"]), len(splits["val"]),
                                                  "images")


def training_data(splits, args, batch_size, strategy=None):
    """``(train, val)`` for a phase's ``batch_size``: the input path ``--input`` chooses,
    with ``--workers``; under ``--distribute multi-worker``, each worker's shards.

    With several replicas the tf.data path drops a partial last batch
    (``distribute.replica_safe`` does it for the generator)."""
    if multiworker.is_multi_worker(strategy):
        return _sharded_input(splits, args, batch_size)
    drop_remainder = bool(strategy) and strategy.num_replicas_in_sync > 1
    return distribute.process_slices(strategy, {  # several JAX processes: each its slice of every batch
        "train": read_split(splits["train"], args, batch_size, True, drop_remainder=drop_remainder),
        "val": read_split(splits["val"], args, batch_size, False, drop_remainder=drop_remainder)}, batch_size)


def read_split(split, args, batch_size, shuffle, features=None, drop_remainder=False):
    """One split through the input path ``--input`` chooses, with ``--workers``; the training
    split (``shuffle``) augmented under ``--augment``; with cached ``features`` (``flow_from_split``,
    ``tf_data_batches``)."""
    augment = shuffle and args.augment
    if args.input == "tf.data":
        return tf_data_batches(split, args.image_size, batch_size, shuffle, args.seed, args.workers,
                             drop_remainder=drop_remainder, features=features, augment=augment)
    return flow_from_split(split, args.image_size, batch_size, shuffle, args.seed, args.workers, features=features,
                           augment=augment)


def phase1_inputs(model, splits, args, trainer, strategy=None):
    """``(fitted_model, train, val)`` for phase 1.

    With Xception frozen, no ``--augment`` and no ``--distribute``, each image's Xception
    features are computed once (``helpers.features``: ``features/<split>-<key>.npy``, float32
    ``(images, 2048)``, read by the same input path as the uncached one) and
    ``classifier_head`` trains on them and the images (for the RNN branch): the same losses
    and weights as the whole model on the same batches (tested). Otherwise (or with
    ``--no-feature-cache``) the whole model trains from the images (``training_data``); the
    log says which and why.
    """
    if not features.phase1_on_cache(trainer, "Xception", "image", args.epochs, args.feature_cache,
                                     args.augment, args.distribute):
        return (model, *training_data(splits, args, args.batch_size, strategy))
    backbone = model.get_layer(BACKBONE)
    head = classifier_head(model)
    datasets = []
    for name, shuffle in (("train", True), ("val", False)):
        split = splits[name]
        cached = features.cached_features(
            backbone, split.paths, trainer.run.features, name, reader=args.input,
            images=lambda: read_split(split, args, args.batch_size, shuffle=False))
        if len(head.inputs) == 2:
            datasets.append(read_split(split, args, args.batch_size, shuffle, features=cached))
        else:  # --cnn-only: the features are the whole input
            datasets.append(features.array_batches(
                cached, keras.utils.to_categorical(split.labels, len(split.class_names)), args.batch_size,
                shuffle, args.seed))
    logger.info("phase 1: the head trains on cached Xception features of %d images (%s)", len(splits["train"]),
                trainer.run.features)
    return (head, *datasets)


def compile_classifier(model, optimizer, jit_compile=False):
    """Compiles for one-hot labels: categorical cross-entropy, accuracy and top-5 accuracy
    (``top5_accuracy``; top-k over all classes, 1.0, with fewer than 5: PyTorch's top-k refuses a
    k above the class count), with ``optimizer`` wrapped for float16 loss scaling when the
    backbone computes in float16 (``precision.loss_scaled``)."""
    top_k = min(5, model.output_shape[-1])
    model.compile(
        optimizer=precision.loss_scaled(model, optimizer),
        jit_compile=backend.jit_compile(jit_compile),
        loss="categorical_crossentropy",
        metrics=["accuracy", keras.metrics.TopKCategoricalAccuracy(k=top_k, name="top5_accuracy")],
    )


def phase1_optimizer(learning_rate):
    """Phase 1's optimizer: the seed's RMSprop.

    Args:
        learning_rate: a float (the seed's 1e-3) or a schedule (``training.Trainer.learning_rate``).
    """
    return keras.optimizers.RMSprop(learning_rate=learning_rate)


def fine_tune_optimizer(learning_rate):
    """Phase 2's optimizer: the seed's Adam, with its update fused (``helpers.optimizers.FusedAdam``).

    Args:
        learning_rate: a float (the seed's 1e-4) or a schedule (``training.Trainer.learning_rate``).
    """
    return FusedAdam(learning_rate=learning_rate)


def train(args):
    """The ``train`` command: two phases, then evaluation and the report.

    Phase 1 freezes Xception (its BatchNormalization in inference mode) and trains the
    RNN branch and the classifier with RMSprop; its best checkpoint is the lowest
    validation loss. Phase 2 starts from that checkpoint and fine-tunes every layer
    with Adam(1e-4), except that Xception's BatchNormalization statistics stay frozen
    (inference mode) unless ``--train-batchnorm`` is given; its best checkpoint is the
    highest validation accuracy. The best model of the last phase that ran is
    evaluated on ``test/`` (else ``val/``, with a warning).

    Raises:
        helpers.errors.ProjectError: bad input or flags, unavailable weights, a NaN
            loss; reported by ``main`` as one line.
    """
    cli.check_training_arguments(args)
    cli.check_backbone_arguments(XCEPTION, args.image_size, args.fine_tune_layers)
    if args.input == "tf.data":
        backend.require_tensorflow("--input tf.data", backend=False)
    if args.distribute == "multi-worker" and backend.is_tensorflow() and args.input != "tf.data":
        raise UsageError("--distribute multi-worker on TensorFlow needs --input tf.data: the generator cannot be "
                         "sharded across TensorFlow's workers (on JAX it is).")
    if args.distribute == "multi-worker" and not backend.is_tensorflow() and args.input != "generator":
        raise UsageError(f"--distribute multi-worker on {backend.name()} reads with --input generator (each process "
                         "its slice of every batch); --input tf.data is TensorFlow's.")
    strategy = distribute.training_strategy(args.distribute, args.devices, args.batch_size,
                                             args.fine_tune_batch_size)
    splits = data.load_splits(args.data_dir)
    class_names = splits["train"].class_names
    with cli.in_flag_words(MODEL_ARGUMENTS):
        check_model_arguments(len(class_names), args.image_size, args.rnn_timesteps, args.rnn_units)
    class_weight = (training.balanced_class_weights(splits["train"].labels, len(class_names))
                    if args.class_weight == "balanced" else None)
    # The run directory's lock is held from here on: a second run on it stops at once.
    with training.Trainer(args.output_dir, strategy, **cli.trainer_arguments(args)) as trainer:
        cli.check_resumable(args, (*MODEL_ARGUMENTS, "fine_tune_layers"), class_names)  # phase 2's trainable weights
        logger.info("checking that all %d images decode and none is in two splits", sum(map(len, splits.values())))
        data.check_splits([(name, split.paths) for name, split in splits.items()], args.skip_image_check,
                          args.allow_duplicates)
        words = data.read_words(args.data_dir / "words.txt")
        if trainer.chief:
            cli.save_args(args, args.output_dir)
            reports.write_json(trainer.run.classes, {
                "class_names": class_names, "descriptions": {c: words[c] for c in class_names if c in words}})
        keras.utils.set_random_seed(args.seed)
        with trainer.scope():
            model = build_cnn_rnn_classifier(num_classes=len(class_names), weights=args.weights,
                                             **cli.model_arguments(args, MODEL_ARGUMENTS))

            # Phase 1: Xception frozen (BatchNormalization in inference mode), RMSprop; the layers above it
            # train, from each image's Xception features computed once when they can be cached
            # (phase1_inputs); best by val loss.
            training.set_backbone_trainable(model, BACKBONE, False)
            model.summary(print_fn=logger.info, line_length=110)
            fitted, train_data, val_data = phase1_inputs(model, splits, args, trainer, strategy)
            compile_classifier(fitted, phase1_optimizer(trainer.learning_rate(args.learning_rate, args.epochs,
                                                                              train_data)), args.jit_compile)
            best = trainer.fit(fitted, "phase1", train_data, val_data, epochs=args.epochs, monitor="val_loss",
                               class_weight=class_weight, save=model, title="phase 1: Xception frozen")

            # Phase 2: from phase 1's best, everything (or Xception's top --fine-tune-layers) but
            # BatchNormalization statistics trains, Adam(1e-4); best by val accuracy.
            model = training.best_model(best, model)
            training.set_backbone_trainable(model, BACKBONE, True, train_batchnorm=args.train_batchnorm,
                                            top_layers=args.fine_tune_layers)
            train_data, val_data = training_data(splits, args, args.fine_tune_batch_size, strategy)
            compile_classifier(model, fine_tune_optimizer(trainer.learning_rate(
                args.fine_tune_learning_rate, args.fine_tune_epochs, train_data)), args.jit_compile)
            best = trainer.fit(model, "phase2", train_data, val_data, epochs=args.fine_tune_epochs,
                               monitor="val_accuracy", class_weight=class_weight,
                               title="phase 2: fine-tuning") or best

        if not trainer.chief:  # the chief evaluates and reports
            distribute.cleanup(strategy, args.output_dir)
            return 0
        split = data.evaluation_split(splits, args.data_dir)  # the seed's 96.14% was measured on val
        metrics = evaluate_classifier(keras.saving.load_model(best), splits[split], args.batch_size, args.input,
                                 args.workers)
        reports.save_evaluation(args.output_dir, metrics, best, [words.get(c, c) for c in class_names])


def evaluate_classifier(model, split, batch_size, input_path="generator", workers=2):
    """Scores ``model`` on every image of a ``data.Split`` (one pass, no shuffling),
    read by ``input_path`` (``"generator"`` or ``"tf.data"``) with ``workers`` threads.

    Returns:
        ``reports.classification_metrics`` plus ``split``: top-1, top-5, per-class
        accuracy and the confusion matrix.
    """
    size = model.input_shape[1]
    read = tf_data_batches if input_path == "tf.data" else flow_from_split
    probabilities = model.predict(read(split, size, batch_size, shuffle=False, workers=workers),
                                  verbose=training.progress_verbosity())
    metrics = {"split": split.name}
    metrics.update(reports.classification_metrics(probabilities, split.labels, split.class_names))
    return metrics


def evaluate(args):
    """The ``evaluate`` command."""
    cli.check_evaluate_arguments(args.batch_size, args.json)
    model, classes = training.load_checkpoint(args.model, "classifier")
    name = cli.evaluation_split_name(args)
    split = data.list_split(args.data_dir / name, classes.get("class_names"), name)
    if model.output_shape[-1] != len(split.class_names):
        raise UsageError(f"{args.model} predicts {model.output_shape[-1]} classes; "
                         f"{split.directory} has {len(split.class_names)}.")
    data.check_images(split.paths)
    metrics = evaluate_classifier(flip_averaged(model, args.tta), split, args.batch_size)
    metrics["model"], metrics["tta"] = str(args.model), args.tta
    print(reports.format_report(metrics, classes.get("descriptions")))
    if args.json:
        reports.write_json(args.json, metrics)


def classify(model, inputs, top_k=5, class_names=None, batch_size=32, tta="none"):
    """The ``top_k`` most probable classes of each image: the Python API ``predict`` prints.

    Args:
        model: a saved ``.keras`` classifier (its class names from the ``classes.json``
            beside it) or a loaded ``keras.Model``.
        inputs: image files and/or arrays ``(height, width, 3)`` RGB 0..255 (uint8, or float
            in 0..255; grayscale and RGBA converted) of any size (``data.rgb_array``: files are
            decoded and resized bilinearly, as the training generator reads them); a single
            path or array is one input.
        top_k: classes per image (capped at the number of classes).
        class_names: the classes in index order (default: the run's ``classes.json``,
            else ``"0"``, ``"1"``, ...).
        batch_size: images per forward pass.
        tta: ``"flip"``: each image's probabilities averaged with its mirror image's
            (``helpers.layers.flip_averaged``; twice the inference time); ``"none"``: the image alone.

    Returns:
        Per input, ``[(class_name, probability), ...]``, most probable first.

    Raises:
        helpers.errors.UsageError: a bad ``top_k``/``batch_size``/``tta``, model or array;
        helpers.data.DatasetError: an image that cannot be decoded.
    """
    if top_k < 1 or batch_size < 1:
        raise UsageError(f"top_k and batch_size must be >= 1. Received: {top_k}, {batch_size}")
    model, names, _ = training.model_and_classes(model, "classifier", class_names)
    model = flip_averaged(model, tta)
    size, inputs = model.input_shape[1], data.as_inputs(inputs)
    ranked = []
    for start in range(0, len(inputs), batch_size):
        images = np.stack([data.rgb_array(item, size, f"input {start + i}")
                           for i, item in enumerate(inputs[start:start + batch_size])])
        probabilities = model.predict(XCEPTION.preprocess_input(images), verbose=0)
        ranked += [reports.top_k(row, names, top_k) for row in probabilities]
    return ranked


def predict(args):
    """The ``predict`` command: prints the top-k classes of each image (``classify``)."""
    if args.top_k < 1 or args.batch_size < 1:  # named by flag, before the model loads
        raise UsageError(f"--top-k and --batch-size must be >= 1. Received: {args.top_k}, {args.batch_size}")
    model, names, descriptions = training.model_and_classes(args.model, "classifier")
    paths = data.image_files(args.inputs)
    data.check_images(paths)
    for path, ranked in zip(paths, classify(model, paths, args.top_k, names, args.batch_size, args.tta)):
        reports.print_ranked(path, ranked, descriptions)


def export(args):
    """The ``export`` command: a SavedModel, TFLite or ONNX model taking raw RGB pixels 0..255 (``helpers.export``);
    with ``--tta flip`` the served probabilities are averaged over each image and its mirror image."""
    from helpers import export as exporting
    from helpers.layers import XceptionPreprocess

    exporting.export_command(args, "classifier", preprocess=XceptionPreprocess(name="xception_preprocess"),
                             transform=lambda model: flip_averaged(model, args.tta))


def main(argv=None, args=None):
    """Runs a command: ``argv`` (default: ``sys.argv[1:]``) or already parsed ``args``."""
    return cli.run(args or parse_args(argv), {"train": train, "evaluate": evaluate, "predict": predict,
                                               "export": export})


if __name__ == "__main__":
    sys.exit(main(args=ARGS))
