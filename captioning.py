#!/usr/bin/env python
"""Image captioning: Xception encoder + LSTM decoder, trained in two phases (seed 004).

Source: the seed write-up ``004_*.txt`` asks for a CNN that turns the image into a feature
description fed into an LSTM, "while the words of the caption ... insert into LSTM cells
from the other way", "cell number one is responsible for producing the first word", and
"both CNN and the LSTM ... trained at the same time". That is Show and Tell (Vinyals et
al., CVPR 2015)::

    image (size, size, 3) RGB 0..255 -> Xception preprocessing -> Xception + average pooling (2048,)
      -> Dense(embedding_dim) = the LSTM's first input (--inject pre)
    tokens <start> w1 ... wn -> Embedding(vocabulary, embedding_dim, masked padding)
      -> LSTM(lstm_units) over [image, <start>, w1, ..., wn] -> at each word step
      -> Dense(vocabulary, softmax): the next word (w1 ... wn <end>), teacher forcing

``--inject merge`` (Tanti et al. 2017) is the ablation: the LSTM reads the words only and
the image joins its output before the softmax. ``--decoder attention`` is Show, Attend and
Tell (Xu et al., ICML 2015): the LSTM attends over Xception's 10 x 10 feature grid at every
word (``helpers.attention``)::

    image -> Xception (no pooling) (10, 10, 2048) -> 100 annotation vectors -> Dense(attention_dim)
    at each step t: alpha_t = softmax(MLP(annotations, h_{t-1})), z_t = sigmoid(f(h_{t-1})) * sum alpha_t a
      h_t = LSTM([E w_{t-1}, z_t]) -> softmax(L_o(E w_{t-1} + L_h h_t + L_z z_t)): the next word

Phase 1 freezes Xception and trains the decoder and the image embedding on Xception's
features, computed once per image and cached in the run (``helpers.features``). Phase 2
unfreezes Xception's top ``--fine-tune-layers`` layers (BatchNormalization stays in
inference mode) and trains the whole model end to end from images at a low learning
rate. Phase 3 (``--self-critical-epochs``) trains the decoder on cached features
again, by self-critical sequence training (Rennie et al., CVPR 2017): on the CIDEr-D of
captions it samples, each against the mean reward of the image's other samples. Captions
come from greedy decoding or batched, length-normalised beam search that carries the LSTM
state between steps; they are scored with the COCO caption evaluation
code (BLEU-1..4, CIDEr-D, METEOR).

Usage::

    python captioning.py [train] --data-dir FLICKR8K --output-dir runs/captioning [--weights imagenet|none|PATH]
    python captioning.py evaluate --model runs/captioning/phase2_best.keras --data-dir FLICKR8K [--split test]
    python captioning.py caption --model runs/captioning/phase2_best.keras [--beam-size 3] [--attention-maps DIR] IMAGE_OR_DIR...
    python captioning.py export --model runs/captioning/phase2_best.keras --output DIR   # SavedModel: image bytes -> caption

A saved model loads in safe mode with ``keras.saving.load_model(path)`` once this module
(or ``helpers.layers``) has been imported; its words are the ``vocabulary.json`` beside it.
"""

import logging
import sys
from pathlib import Path

from helpers import cli
from helpers.backbones import XCEPTION

INJECT = ("pre", "merge")
DECODERS = ("show-and-tell", "attention")
MAX_SELF_CRITICAL_SAMPLES = 64  # captions sampled per image in phase 3: each costs a decoder pass and its memory


def parse_args(argv=None):
    parser, train_parser, evaluate_parser, caption_parser, export_parser = cli.parser_with_commands(
        "Xception + LSTM image captioning (seed 004; Show and Tell, or Show, Attend and Tell), trained in two phases.",
        predict=("caption", "print a caption for each image file or folder"),
        export="write a TensorFlow SavedModel for serving: encoded images (JPEG/PNG bytes) in, caption strings out "
        "(beam search and greedy inside the graph; needs the TensorFlow backend)")
    data = cli.add_data_arguments(train_parser, require_data=False)
    data.description = ("--data-dir: Flickr8k (Flickr8k.token.txt, the Flickr_8k.*Images.txt split files, the "
                        "images folder) or COCO captions (captions_<split>.json and the images)")
    data.add_argument("--download", action="store_true",
                      help="download Flickr8k once into ~/.keras/datasets and use it (needs internet) (default: off)")
    text = train_parser.add_argument_group("text")
    text.add_argument("--min-word-count", type=int, default=5,
                      help="keep words seen at least this often in the training captions (default: 5)")
    text.add_argument("--max-length", type=int, default=30,
                      help="words per caption; longer ones are cut, decoding stops there (default: 30)")
    model = train_parser.add_argument_group("model")
    cli.add_weights_argument(model, "Xception")
    model.add_argument("--image-size", type=int, default=299, help=f"input size in pixels, >= {XCEPTION.min_size} (default: 299)")
    model.add_argument("--embedding-dim", type=int, default=256, help="word and image embedding size (default: 256)")
    model.add_argument("--lstm-units", type=int, default=512, help="LSTM units (default: 512)")
    model.add_argument("--inject", choices=INJECT, default=None,
                       help="show-and-tell's image input: pre: the image is the LSTM's first input (Show and Tell); "
                       "merge: it joins the LSTM's output (Tanti et al. 2017); refused with --decoder attention "
                       "(default: pre)")
    model.add_argument("--decoder", choices=DECODERS, default="show-and-tell",
                       help="show-and-tell: the LSTM sees the pooled image (Vinyals et al. 2015); attention: it "
                       "attends over Xception's 10 x 10 feature grid at every word (Xu et al. 2015) "
                       "(default: show-and-tell)")
    model.add_argument("--attention-dim", type=int, default=512,
                       help="the attention's size: the grid's channels are projected to it, and its MLP's hidden "
                       "layer (--decoder attention) (default: 512)")
    model.add_argument("--attention-penalty", type=float, default=1.0,
                       help="weight of the doubly stochastic attention penalty, 0 = off (--decoder attention) "
                       "(default: 1.0)")
    model.add_argument("--dropout", type=float, default=0.5, help="dropout on embeddings and LSTM output (default: 0.5)")
    model.add_argument("--fine-tune-layers", type=int, default=16,
                       help=f"Xception's top layers trained in phase 2, 0..{XCEPTION.layers} (default: 16, blocks 13 and 14)")
    cli.add_training_arguments(train_parser, epochs=10, fine_tune_epochs=1, batch_size=64, fine_tune_batch_size=32,
                               learning_rate=1e-3, fine_tune_learning_rate=1e-4, lr_schedule="cosine",
                               class_weight=False)
    critical = train_parser.add_argument_group(
        "self-critical training", "phase 3: the decoder, on cached features, trained on the CIDEr-D of captions "
        "it samples (Rennie et al. 2017), after phases 1 and 2; best epoch by greedy CIDEr-D on val")
    critical.add_argument("--self-critical-epochs", type=int, default=0, help="phase 3's epochs, 0 = off (default: 0)")
    critical.add_argument("--self-critical-batch-size", type=int, default=32,
                          help="images per batch, each with --self-critical-samples captions (default: 32)")
    critical.add_argument("--self-critical-samples", type=int, default=5,
                          help="captions sampled per image, 2..64; each one's baseline is the others' mean reward "
                          "(default: 5)")
    critical.add_argument("--self-critical-learning-rate", type=float, default=5e-5,
                          help="Adam's learning rate, without cosine decay or warm-up (--lr-schedule plateau "
                          "still lowers it) (default: 5e-05)")
    _add_decoding_arguments(train_parser)
    cli.add_performance_arguments(train_parser, distribute=False)
    cli.add_output_arguments(train_parser)

    cli.add_evaluate_arguments(evaluate_parser, batch_size=64)
    _add_decoding_arguments(evaluate_parser)

    caption_parser.add_argument("--model", required=True, type=Path, help="a saved captioner .keras; required")
    _add_decoding_arguments(caption_parser)
    caption_parser.add_argument("--batch-size", type=int, default=32, help="images per batch (default: 32)")
    caption_parser.add_argument("--attention-maps", type=Path, metavar="DIR",
                                help="also write DIR/<image name>.png per image: each word and where the attention "
                                "decoder looked for it (--decoder attention models) (default: off)")
    caption_parser.add_argument("--verbose", action="store_true", help="debug logging (default: off)")
    caption_parser.add_argument("inputs", nargs="+", help="image files or folders (searched recursively)")
    _add_decoding_arguments(export_parser)
    return parser.parse_args(cli.with_default_command(argv))


def _add_decoding_arguments(parser):
    parser.add_argument("--beam-size", type=int, default=3,
                        help="beam search width; 1 is greedy decoding (default: 3)")


if __name__ == "__main__":
    ARGS = cli.parse_before_backend(parse_args)

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402

from helpers import backend, captions, data, features, precision, reports, rundir, training  # noqa: E402
from helpers.attention import DoublyStochasticPenalty, SoftAttentionLSTM  # noqa: E402
from helpers.backbones import pretrained_backbone  # noqa: E402
from helpers.captions import END_ID, PAD_ID, START_ID, UNK_ID  # noqa: E402
from helpers.errors import UsageError  # noqa: E402
from helpers.layers import AddToSteps, DropFirstStep, PrependStep, XceptionPreprocess  # noqa: E402
from helpers.optimizers import FusedAdam  # noqa: E402

logger = logging.getLogger(__name__)

BACKBONE = XCEPTION.name
# The builder's keyword arguments that come from flags of the same name: passed from here
# (``cli.model_arguments``), and compared by the resume check.
MODEL_ARGUMENTS = ("image_size", "embedding_dim", "lstm_units", "decoder", "inject", "attention_dim", "attention_penalty",
                   "dropout", "mixed_precision")
TEXT_ARGUMENTS = ("min_word_count", "max_length")


def check_model_arguments(vocabulary_size, image_size, embedding_dim, lstm_units, decoder, inject, attention_dim,
                          attention_penalty, dropout):
    """Raises ``UsageError`` (a ``ValueError``) echoing the first argument the model cannot be built with."""
    if vocabulary_size < 5:
        raise UsageError(f"vocabulary_size must be at least 5 (padding, <unk>, <start>, <end> and a word). "
                         f"Received: vocabulary_size={vocabulary_size}")
    if image_size < XCEPTION.min_size:
        raise UsageError(f"image_size must be at least {XCEPTION.min_size} (Xception's minimum). "
                         f"Received: image_size={image_size}")
    if embedding_dim < 1 or lstm_units < 1 or attention_dim < 1:
        raise UsageError(f"embedding_dim, lstm_units and attention_dim must be at least 1. Received: "
                         f"embedding_dim={embedding_dim}, lstm_units={lstm_units}, attention_dim={attention_dim}")
    if decoder not in DECODERS:
        raise UsageError(f"decoder must be one of {DECODERS}. Received: decoder={decoder!r}")
    if inject not in INJECT:
        raise UsageError(f"inject must be one of {INJECT}. Received: inject={inject!r}")
    if not attention_penalty >= 0:
        raise UsageError(f"attention_penalty must be >= 0. Received: attention_penalty={attention_penalty}")
    if not 0 <= dropout < 1:
        raise UsageError(f"dropout must be in [0, 1). Received: dropout={dropout}")


def build_captioner(vocabulary_size, image_size=299, embedding_dim=256, lstm_units=512, decoder="show-and-tell",
                    inject="pre", attention_dim=512, attention_penalty=1.0, dropout=0.5, weights="imagenet",
                    mixed_precision="off"):
    """Builds the captioner: an ``encoder`` (Xception) and a ``decoder`` (LSTM) in one model.

    Args:
        vocabulary_size: words of the vocabulary with the 4 special tokens (``helpers.captions``), >= 5.
        image_size: image height and width in pixels, at least 71 (Xception's minimum).
        embedding_dim: size of the word embeddings and of the image embedding fed to the LSTM.
        lstm_units: LSTM units.
        decoder: ``"show-and-tell"``: the LSTM sees Xception's average-pooled features
            (Vinyals et al. 2015), as ``inject`` says; ``"attention"``: at every word it attends
            over Xception's feature grid (10 x 10 x 2048 at 299 px; Xu et al. 2015, soft
            attention with the gating scalar, the deep output layer and the doubly stochastic
            penalty; ``helpers.attention``).
        inject: the show-and-tell decoder's image input: ``"pre"``: the image embedding is the
            LSTM's first input (Show and Tell, the seed); ``"merge"``: the LSTM reads the words only
            and the image embedding (then of ``lstm_units``) is added to its output before a ReLU
            Dense (Tanti et al. 2017). Unused by the attention decoder.
        attention_dim: the size the grid's 2048 channels are projected to and the attention MLP's
            hidden size (attention decoder).
        attention_penalty: the doubly stochastic penalty's weight ``lambda`` >= 0 (attention decoder).
        dropout: rate of the dropout on the word and image embeddings and the LSTM output.
        weights: Xception weights: ``"imagenet"``, ``None``/``"none"``, or a no-top weights file path.
        mixed_precision: ``"off"``, ``"bfloat16"``, ``"float16"`` or ``"auto"``: Xception's compute
            dtype only (``helpers.precision``); the decoder stays float32.

    Returns:
        A functional ``keras.Model`` ``captioner`` with inputs ``[image, tokens]``: ``(batch, size,
        size, 3)`` float32 RGB 0..255 and ``(batch, steps)`` int32 word ids (``<start> w1 ... wn``,
        0-padded), and output ``(batch, steps, vocabulary_size)`` float32 next-word probabilities,
        masked where the tokens are padding. Nested models: ``encoder`` (image -> ``(batch, 2048)``
        pooled features, or ``(batch, positions, 2048)`` the grid for attention; holds ``xception``)
        and ``decoder`` (``[features, tokens]`` -> probabilities; layers ``word_embedding``,
        ``lstm``, ``next_word``, and ``image_embedding`` or the attention's).

    Raises:
        helpers.errors.UsageError: an argument is out of range (a ``ValueError``; the message echoes it).
        helpers.errors.MissingFileError, helpers.backbones.WeightsUnavailableError: as for the weights.
    """
    check_model_arguments(vocabulary_size, image_size, embedding_dim, lstm_units, decoder, inject, attention_dim,
                          attention_penalty, dropout)
    image = keras.Input((image_size, image_size, 3), name="image")
    attention = decoder == "attention"
    backbone = pretrained_backbone(XCEPTION.constructor(), weights, precision.resolve(mixed_precision),
                                   input_shape=(image_size, image_size, 3), pooling=None if attention else "avg")
    features_out = backbone(XceptionPreprocess(name="xception_preprocess")(image))
    if attention:  # (batch, rows, columns, 2048) -> (batch, positions, 2048)
        rows, columns, channels = backbone.output_shape[1:]
        features_out = keras.layers.Reshape((rows * columns, channels), name="grid")(features_out)
    features_out = keras.layers.Activation("linear", dtype="float32", name="features")(features_out)
    encoder = keras.Model(image, features_out, name="encoder")
    if attention:
        decoder = build_attention_decoder(vocabulary_size, encoder.output_shape[1:], embedding_dim, lstm_units,
                                          attention_dim, attention_penalty, dropout)
    else:
        decoder = build_decoder(vocabulary_size, encoder.output_shape[-1], embedding_dim, lstm_units, inject, dropout)
    tokens = keras.Input((None,), dtype="int32", name="tokens")
    return keras.Model([image, tokens], decoder([encoder(image), tokens]), name="captioner")


def build_decoder(vocabulary_size, feature_dim, embedding_dim, lstm_units, inject, dropout):
    """The show-and-tell decoder of ``build_captioner``: ``[features (batch, feature_dim), tokens
    (batch, steps)]`` -> ``(batch, steps, vocabulary_size)`` probabilities, masked on padding."""
    features_in = keras.Input((feature_dim,), name="features")
    tokens = keras.Input((None,), dtype="int32", name="tokens")
    words = keras.layers.Embedding(vocabulary_size, embedding_dim, mask_zero=True, name="word_embedding")(tokens)
    words = keras.layers.Dropout(dropout, name="word_dropout")(words)
    image = keras.layers.Dense(embedding_dim if inject == "pre" else lstm_units, name="image_embedding")(features_in)
    image = keras.layers.Dropout(dropout, name="image_dropout")(image)
    lstm = keras.layers.LSTM(lstm_units, return_sequences=True, return_state=True, name="lstm")
    if inject == "pre":  # [image, <start>, w1, ...]: the output at the image step predicts nothing
        outputs = DropFirstStep(name="drop_image_step")(lstm(PrependStep(name="prepend_image")([image, words]))[0])
        outputs = keras.layers.Dropout(dropout, name="lstm_dropout")(outputs)
    else:
        outputs = keras.layers.Dropout(dropout, name="lstm_dropout")(lstm(words)[0])
        outputs = keras.layers.Dense(lstm_units, activation="relu", name="merge_dense")(
            AddToSteps(name="add_image")([outputs, image]))
    probabilities = keras.layers.Dense(vocabulary_size, activation="softmax", name="next_word")(outputs)
    return keras.Model([features_in, tokens], probabilities, name="decoder")


def build_attention_decoder(vocabulary_size, grid_shape, embedding_dim, lstm_units, attention_dim, attention_penalty,
                            dropout):
    """The attention decoder of ``build_captioner`` (Xu et al. 2015, soft attention):
    ``[features (batch, positions, feature_dim), tokens (batch, steps)]`` -> ``(batch, steps,
    vocabulary_size)`` probabilities, masked on padding.

    Xception's 2048 channels are first projected to ``attention_dim`` (a linear ``Dense``,
    once per image): the annotation vectors the LSTM attends over. Measured on the 2-core AMD
    CPU, attending over the 2048 channels themselves trained 2.8x slower per caption (1.84 s
    against 0.65 s per step of 64 captions). The output is Xu et al.'s deep output layer
    (eq. 7): ``softmax(L_o(E y_{t-1} + L_h h_t + L_z z_t))``, with dropout on the word
    embedding and on ``h_t``. The doubly stochastic penalty joins the loss through
    ``attention_penalty`` (``helpers.attention``).

    The ``tokens`` batch may hold ``C`` captions per image of ``features`` (image-major, ``C``
    = the ratio of the batch sizes): phase 1 then projects and attends over each grid once for
    all of its captions.
    """
    features_in = keras.Input(tuple(grid_shape), name="features")
    tokens = keras.Input((None,), dtype="int32", name="tokens")
    words = keras.layers.Embedding(vocabulary_size, embedding_dim, mask_zero=True, name="word_embedding")(tokens)
    words = keras.layers.Dropout(dropout, name="word_dropout")(words)
    annotations = keras.layers.Dense(attention_dim, name="annotations")(features_in)  # once per image
    hidden, contexts, alphas = SoftAttentionLSTM(lstm_units, attention_dim, name="lstm")([words, annotations])
    hidden = DoublyStochasticPenalty(attention_penalty, name="attention_penalty")([hidden, alphas])
    hidden = keras.layers.Dropout(dropout, name="lstm_dropout")(hidden)
    deep = keras.layers.Add(name="deep_output")([
        words, keras.layers.Dense(embedding_dim, name="deep_hidden")(hidden),
        keras.layers.Dense(embedding_dim, name="deep_context")(contexts)])
    probabilities = keras.layers.Dense(vocabulary_size, activation="softmax", name="next_word")(deep)
    return keras.Model([features_in, tokens], probabilities, name="decoder")


def compile_captioner(model, optimizer, jit_compile=False):
    """Sparse categorical cross-entropy on the next word and its accuracy, both masked on padding
    (the output's Keras mask), with float16 loss scaling when needed (``precision.loss_scaled``)."""
    model.compile(optimizer=precision.loss_scaled(model, optimizer), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"], jit_compile=backend.jit_compile(jit_compile))


def compile_self_critical(model, optimizer, jit_compile=False):
    """The decoder for ``SelfCriticalBatches``: the masked cross-entropy weighted by their sample
    weights (the advantages) is the policy gradient's surrogate loss; no accuracy (weights of
    either sign make it meaningless)."""
    model.compile(optimizer=precision.loss_scaled(model, optimizer), loss="sparse_categorical_crossentropy",
                  jit_compile=backend.jit_compile(jit_compile))


def adam(learning_rate):
    """Adam with gradient-norm clipping at 5, usual for LSTM language models.

    Args:
        learning_rate: a float or a schedule (``helpers.training.Trainer.learning_rate``).
    """
    return FusedAdam(learning_rate=learning_rate, clipnorm=5.0)


# ----------------------------------------------------------------------------- data

BUCKET_BOUNDARIES = (9, 11, 13, 15, 18, 22)  # token steps; Flickr8k captions are mostly 8-16 words


def bucket_steps(steps, most):
    """The step count that a batch whose longest target has ``steps`` steps is padded to under
    ``CaptionBatches(pad_to_bucket=True)``: its bucket's upper ``BUCKET_BOUNDARIES`` boundary
    minus 1 (below 9: 8; 9-10: 10; ...), at most ``most`` (the caption table's width minus 1,
    also the last bucket's)."""
    bucket = int(np.digitize(steps, BUCKET_BOUNDARIES))
    return min(BUCKET_BOUNDARIES[bucket] - 1 if bucket < len(BUCKET_BOUNDARIES) else most, most)


class CaptionTable:
    """Every caption of a split as word ids, with the image it belongs to.

    Attributes:
        ids: ``(num_captions, max_length + 2)`` int32, ``<start> w1 ... wn <end>`` 0-padded.
        lengths: ``(num_captions,)`` int32 tokens per caption (with ``<start>`` and ``<end>``).
        image: ``(num_captions,)`` int32 index of each caption's image in the split.
        first, count: ``(num_images,)`` int32 index of each image's first caption, and its number.
    """

    def __init__(self, split, vocabulary):
        texts = [text for refs in split.captions for text in refs]
        self.count = np.array([len(refs) for refs in split.captions], np.int32)
        self.first = np.concatenate([[0], np.cumsum(self.count)[:-1]]).astype(np.int32)
        self.image = np.repeat(np.arange(len(split), dtype=np.int32), self.count)
        self.ids, self.lengths = vocabulary.encode(texts)


def _teacher_forcing(ids, length):
    """``(<start> w1 ... wn, w1 ... wn <end>)``: the decoder's input and its targets."""
    return ids[: length - 1], ids[1:length]


def _batched(dataset, batch_size, target_lengths):
    """Batches of captions of similar length (bucketing), each padded to its longest with 0.

    ``target_lengths`` (one per element) give the number of batches, declared to tf.data so that
    Keras knows the epoch's length (``tf.data.experimental.assert_cardinality``).
    """
    import tensorflow as tf

    per_bucket = np.bincount(np.digitize(target_lengths, BUCKET_BOUNDARIES), minlength=len(BUCKET_BOUNDARIES) + 1)
    batches = int(sum(-(-n // batch_size) for n in per_bucket))
    return dataset.bucket_by_sequence_length(
        element_length_func=lambda x, y: tf.shape(y)[0], bucket_boundaries=list(BUCKET_BOUNDARIES),
        bucket_batch_sizes=[batch_size] * (len(BUCKET_BOUNDARIES) + 1)
    ).apply(tf.data.experimental.assert_cardinality(batches)).prefetch(2)


def _tf_data_from(batches, prefetch=2):
    """A ``CaptionBatches`` (or ``SelfCriticalBatches``) of cached features as a ``tf.data.Dataset``
    with free batch and step sizes (``backend.tf_dataset_with_free_shapes``)."""
    import tensorflow as tf

    free = tf.TensorSpec((None, None), tf.int32)
    signature = ((tf.TensorSpec((None, *batches.features.shape[1:]), tf.float32), free), free)
    if isinstance(batches, SelfCriticalBatches):  # and the sample weights
        signature += (tf.TensorSpec((None, None), tf.float32),)
    return backend.tf_dataset_with_free_shapes(batches, signature, prefetch)


def feature_caption_batches(cached, table, batch_size, shuffle=False, seed=0):
    """Phase 1 input: ``((features (batch, 2048) or (batch, positions, 2048) float32, tokens (batch,
    steps) int32), targets (batch, steps) int32)`` for every caption (an epoch sees each caption
    once), from cached features (float32, or a float16 grid), bucketed by length: ``tf.data``
    for pooled features on the TensorFlow backend, else a ``CaptionBatches``."""
    if not backend.is_tensorflow():
        return CaptionBatches(table, batch_size, shuffle, seed, features=cached)
    import tensorflow as tf

    if cached.ndim > 2:  # a feature grid stays in numpy (gathered per batch), read through tf.data
        return _tf_data_from(CaptionBatches(table, batch_size, shuffle, seed, features=cached))

    cached = tf.constant(cached)
    dataset = tf.data.Dataset.from_tensor_slices((table.image, table.ids, table.lengths))
    if shuffle:
        dataset = dataset.shuffle(len(table.image), seed=seed, reshuffle_each_iteration=True)

    def pair(image, ids, length):
        tokens, targets = _teacher_forcing(ids, length)
        return (tf.gather(cached, image), tokens), targets

    return _batched(dataset.map(pair, num_parallel_calls=tf.data.AUTOTUNE), batch_size, table.lengths - 1)


def image_caption_batches(split, table, image_size, batch_size, shuffle=False, seed=0, workers=None):
    """Phase 2 input: ``((images (batch, size, size, 3) float32 0..255, tokens), targets)``, each image
    once per epoch with one of its captions: a random one in training, a fixed one otherwise;
    ``tf.data`` (``workers`` parallel reads, default ``AUTOTUNE``) on the TensorFlow backend, a
    ``CaptionBatches`` (``workers`` threads, default 2) on the others."""
    if not backend.is_tensorflow():
        return CaptionBatches(table, batch_size, shuffle, seed, paths=split.paths, image_size=image_size,
                              workers=workers or 2)
    import tensorflow as tf

    workers = workers or tf.data.AUTOTUNE
    ids, lengths = tf.constant(table.ids), tf.constant(table.lengths)
    dataset = tf.data.Dataset.from_tensor_slices(([str(p) for p in split.paths], table.first, table.count))
    if shuffle:
        dataset = dataset.shuffle(len(split), seed=seed, reshuffle_each_iteration=True)

    def pair(path, first, count):
        pick = first + (tf.random.uniform([], 0, count, dtype=tf.int32) if shuffle else 0)
        tokens, targets = _teacher_forcing(ids[pick], lengths[pick])
        return (features.tf_read_rgb(path, image_size), tokens), targets

    # Training picks a random caption per image: its length, and so its bucket, is known only then.
    if shuffle:
        return dataset.map(pair, num_parallel_calls=workers).padded_batch(batch_size).prefetch(2)
    return _batched(dataset.map(pair, num_parallel_calls=workers), batch_size, table.lengths[table.first] - 1)


class CaptionBatches(keras.utils.PyDataset):
    """``feature_caption_batches`` and ``image_caption_batches`` as a ``keras.utils.PyDataset``: the
    same examples, bucketing and padding (the backends other than TensorFlow, and feature grids).

    With ``features`` (phase 1) an epoch holds every caption with its image's cached features;
    with ``paths`` (phase 2) every image once, with a random caption drawn each epoch when
    ``shuffle``, else its first, read by ``helpers.data.read_rgb``. Captions are grouped by the
    ``BUCKET_BOUNDARIES`` of their target length (not phase 2's shuffled training batches, as in
    the ``tf.data`` path) and each batch is padded with 0 to its longest, or with
    ``pad_to_bucket`` (the default on the backends other than TensorFlow) further, to its bucket's
    boundary (``bucket_steps``): there every new batch shape is a new XLA compilation of the
    train step, so the step counts are bounded to ``len(BUCKET_BOUNDARIES) + 1`` (TensorFlow's
    ``tf.function`` relaxes the step dimension instead). The padding is masked: the loss is the
    same. ``shuffle`` reshuffles the examples and the batches every epoch
    (``numpy.random.default_rng(seed)``).

    A feature grid (``features`` of 3 dimensions, the attention decoder's) is batched by image:
    each batch holds ``max(1, batch_size // C)`` images once and all of their captions, ``C``
    per image (the most any image has; an image with fewer gets empty, fully padded rows),
    image-major, so the decoder attends over each grid once for its ``C`` captions. Images are
    bucketed by their longest caption.

    Batches: ``((features (batch, 2048) float32 | grids (images, positions, 2048) float32 |
    images (batch, size, size, 3) float32 0..255, tokens (batch, steps) int32), targets
    (batch, steps) int32)``.
    """

    def __init__(self, table, batch_size, shuffle=False, seed=0, features=None, paths=None, image_size=None,
                 workers=1, pad_to_bucket=None):
        super().__init__(workers=workers)
        self.table, self.batch_size, self.shuffle = table, batch_size, shuffle
        self.pad_to_bucket = not backend.is_tensorflow() if pad_to_bucket is None else pad_to_bucket
        self.features, self.paths, self.image_size = features, paths, image_size
        self.grid = features is not None and features.ndim == 3
        self.per_image = int(table.count.max())
        self.rng = np.random.default_rng(seed)
        self.batches = self._plan()

    def _plan(self):
        table, batch_size = self.table, self.batch_size
        if self.grid:  # each image once; its bucket is its longest caption's
            rows = np.arange(len(table.first))
            lengths = np.maximum.reduceat(table.lengths, table.first) - 1
            batch_size = max(1, batch_size // self.per_image)
        elif self.features is not None:  # every caption
            rows = np.arange(len(table.image))
        else:  # each image once, with one caption
            rows = table.first + (self.rng.integers(0, table.count) if self.shuffle else 0)
        if not self.grid:
            lengths = table.lengths[rows] - 1
        if self.shuffle:
            order = self.rng.permutation(len(rows))
            rows, lengths = rows[order], lengths[order]
        if self.shuffle and self.features is None:
            groups = [rows]
        else:
            buckets = np.digitize(lengths, BUCKET_BOUNDARIES)
            groups = [rows[buckets == bucket] for bucket in range(len(BUCKET_BOUNDARIES) + 1)]
        batches = [group[i:i + batch_size] for group in groups for i in range(0, len(group), batch_size)]
        if self.shuffle:
            batches = [batches[i] for i in self.rng.permutation(len(batches))]
        return batches

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, index):
        rows, table = self.batches[index], self.table
        images = rows if self.grid else table.image[rows]
        if self.grid:  # all captions of each image, C per image, -1 where an image has fewer
            offsets = np.arange(self.per_image)
            rows = np.where(offsets[None, :] < table.count[images, None], table.first[images, None] + offsets, -1)
            rows = rows.reshape(-1)
        lengths = np.where(rows >= 0, table.lengths[rows] - 1, 0)  # teacher forcing: <start> w1 ... wn -> w1 ... <end>
        steps = int(lengths.max())
        if self.pad_to_bucket:
            steps = bucket_steps(steps, table.ids.shape[1] - 1)
        tokens = table.ids[rows, :steps].copy()
        targets = table.ids[rows, 1:steps + 1].copy()
        tokens[np.arange(steps)[None, :] >= lengths[:, None]] = PAD_ID  # the <end> of a shorter caption
        targets[rows < 0] = PAD_ID
        if self.features is not None:
            first = np.asarray(self.features[images], np.float32)
        else:
            first = np.stack([data.read_rgb(self.paths[i], self.image_size) for i in images])
        return (first, tokens), targets

    def on_epoch_end(self):
        if self.shuffle:
            self.batches = self._plan()


class SelfCriticalBatches(keras.utils.PyDataset):
    """Self-critical sequence training's batches (Rennie et al., CVPR 2017), drawn from the
    decoder as it trains: for each image ``samples`` captions sampled word by word
    (``sample_search``), each rewarded by its CIDEr-D against the image's references
    (``helpers.captions.CiderD``, the training references' document frequencies), with the
    mean reward of the image's other samples as the baseline (Luo 2020, "A better variant of
    self-critical sequence training"; no greedy decoding needed). A batch is the sampled
    captions under teacher forcing with their advantage, reward minus baseline, as the sample
    weight of every word: the cross-entropy loss weighted so is the policy gradient's
    surrogate, ``-(r - b) log p(caption)``, so ``model.fit`` trains it with the decoder's
    compiled train step.

    Args:
        decoder: a ``StepDecoder`` of the captioner being trained (it reads its current weights).
        features: ``(num_images, 2048)`` float32 pooled features, or ``(num_images, positions,
            2048)`` grids (attention), of the training images, from the captioner's encoder.
        scorer: a ``helpers.captions.CiderD`` of the same images' references, in order.
        vocabulary: the ``helpers.captions.Vocabulary``; its ``max_length`` bounds the samples.
        images_per_batch: images per batch (each with ``samples`` captions).
        samples: captions sampled per image, >= 2 (the baseline is the others' mean).
        seed: the image order's and the sampling's ``numpy.random.default_rng`` seed.
        pad_to_bucket: pad each batch's steps to its ``bucket_steps`` (default: on the backends
            other than TensorFlow, as ``CaptionBatches``).

    Batches: ``((features (rows, 2048) float32 | grids (images, positions, 2048) float32,
    tokens (rows, steps) int32), targets (rows, steps) int32, weights (rows, steps) float32)``,
    ``rows = images * samples`` image-major; weights 0 on padding. ``rewards`` holds the
    rewards of the captions sampled since it was last emptied.
    """

    def __init__(self, decoder, features, scorer, vocabulary, images_per_batch, samples=5, seed=0,
                 pad_to_bucket=None):
        super().__init__()
        if samples < 2 or images_per_batch < 1:
            raise UsageError(f"self-critical training needs >= 2 samples per image and >= 1 image per batch. "
                             f"Received: samples={samples}, images_per_batch={images_per_batch}")
        self.decoder, self.features, self.scorer, self.vocabulary = decoder, features, scorer, vocabulary
        self.images_per_batch, self.samples = images_per_batch, samples
        self.pad_to_bucket = not backend.is_tensorflow() if pad_to_bucket is None else pad_to_bucket
        self.rng = np.random.default_rng(seed)
        self.order = self.rng.permutation(len(features))
        self.rewards = []

    def __len__(self):
        return -(-len(self.features) // self.images_per_batch)

    def __getitem__(self, index):
        images = self.order[index * self.images_per_batch:(index + 1) * self.images_per_batch]
        k, max_length = self.samples, self.vocabulary.max_length + 1  # the words and <end>
        first = np.asarray(self.features[images], np.float32)
        ids = sample_search(self.decoder.step, self.decoder.start(first), len(images), k, max_length, self.rng)
        rows = np.repeat(images, k)
        rewards = self.scorer.scores(rows, [self.vocabulary.decode(caption) for caption in ids])
        self.rewards.extend(rewards.tolist())
        grouped = rewards.reshape(len(images), k)
        advantages = (grouped - (grouped.sum(axis=1, keepdims=True) - grouped) / (k - 1)).reshape(-1)
        lengths = (ids != PAD_ID).sum(axis=1)  # words and <end>: the targets
        steps = int(lengths.max())
        if self.pad_to_bucket:
            steps = bucket_steps(steps, max_length)
        targets = ids[:, :steps]  # 0 after each caption's <end>; steps <= ids' width
        tokens = np.concatenate([np.full((len(rows), 1), START_ID, np.int32), targets[:, :-1]], axis=1)
        tokens[np.arange(steps)[None, :] >= lengths[:, None]] = PAD_ID  # the <end> is a target, not an input
        weights = (advantages[:, None] * (targets != PAD_ID)).astype(np.float32)
        if not self.decoder.attention:  # show-and-tell: each caption with its image's features
            first = np.repeat(first, k, axis=0)
        return (first, tokens), targets, weights

    def on_epoch_end(self):
        self.order = self.rng.permutation(len(self.features))

    def fit_input(self):
        """What ``model.fit`` trains on: on TensorFlow a ``tf.data.Dataset`` over these batches
        without prefetching, elsewhere the ``PyDataset`` itself (one worker: read in step), so
        that every batch is sampled after the previous train step, from the updated decoder."""
        return _tf_data_from(self, prefetch=0) if backend.is_tensorflow() else self


class SelfCriticalValidation(keras.callbacks.Callback):
    """Keeps the sampling decoder current and adds to each epoch's logs, before the checkpoint
    and the CSV log read them, ``val_cider_d``: the CIDEr-D of greedy captions of the
    validation images (the COCO code, as the evaluation), which picks self-critical training's
    best epoch, and ``reward``: the mean CIDEr-D reward of the epoch's sampled training captions.

    On JAX, ``model.fit`` holds the weights in its own state while an epoch runs: after each
    batch this syncs them back (``jax_state_sync``) and gives the sampler a snapshot
    (``StepDecoder.snapshot``), so the next batch is sampled from the decoder just updated.

    Args:
        batches: the ``SelfCriticalBatches`` being trained on.
        features: ``(num_images, ...)`` float32 features of the validation images.
        references: per validation image, its references (``standardize``d, joined by spaces).
    """

    def __init__(self, batches, features, references):
        super().__init__()
        self.batches, self.features, self.references = batches, features, references

    def _sync(self):
        if backend.name() == "jax":
            self.model.jax_state_sync()
        self.batches.decoder.snapshot()

    def on_train_begin(self, logs=None):
        self._sync()

    def on_train_batch_end(self, batch, logs=None):
        self._sync()

    def on_epoch_end(self, epoch, logs=None):
        self._sync()
        if logs is None:
            return
        vocabulary = self.batches.vocabulary
        found = self.batches.decoder.captions(self.features, 1, vocabulary.max_length)
        logs["val_cider_d"] = captions.caption_scores(self.references, [vocabulary.decode(ids) for ids in found],
                                                      meteor=False)["cider_d"]
        logs["reward"] = float(np.mean(self.batches.rewards)) if self.batches.rewards else float("nan")
        self.batches.rewards.clear()


def cached_train_val_features(encoder, splits, run):
    """``{"train": ..., "val": ...}``: the encoder's features of those splits' images from the run's
    cache (``helpers.features``), computed once; an attention encoder's grids in float16 on disk."""
    grid = len(encoder.output_shape) == 3  # (positions, 2048)
    return {name: features.cached_features(encoder, splits[name].paths, run.features, name,
                                           dtype="float16" if grid else "float32")
            for name in ("train", "val")}


def load_data(args):
    """``(splits, vocabulary)``: the dataset's splits (``helpers.captions``) and the vocabulary of its
    training captions."""
    data_dir = captions.download_flickr8k() if args.download else args.data_dir
    if data_dir is None:
        raise UsageError("Pass --data-dir DIR (Flickr8k or COCO captions format) or --download (Flickr8k).")
    args.data_dir = Path(data_dir)
    splits = captions.load_caption_splits(args.data_dir)
    vocabulary = captions.Vocabulary.from_captions([t for refs in splits["train"].captions for t in refs],
                                                   args.min_word_count, args.max_length)
    if len(vocabulary) == len(captions.SPECIAL_TOKENS):
        raise UsageError(f"--min-word-count {args.min_word_count} keeps no word: no word of the training captions "
                         f"({splits['train'].source}) is seen that often; lower it.")
    logger.info("data: %s; vocabulary: %d tokens (words seen >= %d times in the training captions)",
                ", ".join(f"{s.name} {len(s)} images" for s in splits.values()), len(vocabulary), args.min_word_count)
    return splits, vocabulary


# ----------------------------------------------------------------------------- training

def train(args):
    """The ``train`` command: phase 1 on cached features, phase 2 end to end, phase 3 (self-critical,
    when asked) on cached features, then evaluation of the last phase's best checkpoint.

    Phase 1's best checkpoint is the lowest validation loss (on all of the val captions);
    phase 2's too (each val image with a fixed one of its captions), since BLEU on the
    val split every epoch would cost as much as the epoch on this CPU; phase 3's the highest
    CIDEr-D of greedy val captions (decoding on cached features is cheap).

    Raises:
        helpers.errors.ProjectError: bad input or flags, unavailable weights, a NaN loss.
    """
    cli.check_training_arguments(args)
    with cli.in_flag_words(TEXT_ARGUMENTS):
        captions.check_text_arguments(args.min_word_count, args.max_length)
    for flag, value, ok, wanted in (
            ("--fine-tune-layers", args.fine_tune_layers, 0 <= args.fine_tune_layers <= XCEPTION.layers,
             f"in [0, {XCEPTION.layers}]"),
            ("--beam-size", args.beam_size, args.beam_size >= 1, ">= 1"),
            ("--self-critical-epochs", args.self_critical_epochs, args.self_critical_epochs >= 0, ">= 0"),
            ("--self-critical-batch-size", args.self_critical_batch_size, args.self_critical_batch_size >= 1, ">= 1"),
            ("--self-critical-samples", args.self_critical_samples,
             2 <= args.self_critical_samples <= MAX_SELF_CRITICAL_SAMPLES, f"in [2, {MAX_SELF_CRITICAL_SAMPLES}]"),
            ("--self-critical-learning-rate", args.self_critical_learning_rate,
             0 < args.self_critical_learning_rate < float("inf"), "a positive number")):
        if not ok:
            raise UsageError(f"{flag} must be {wanted}. Received: {flag} {value}")
    if args.decoder == "attention" and args.inject is not None:
        raise UsageError("--inject is show-and-tell's choice; the attention decoder reads the image at every word. "
                         f"Received: --decoder attention --inject {args.inject}")
    args.inject = args.inject or "pre"
    splits, vocabulary = load_data(args)
    with cli.in_flag_words(MODEL_ARGUMENTS):
        check_model_arguments(vocabulary_size=len(vocabulary), **cli.model_arguments(
            args, [name for name in MODEL_ARGUMENTS if name != "mixed_precision"]))
    with training.Trainer(args.output_dir, **cli.trainer_arguments(args)) as trainer:
        run = trainer.run
        cli.check_resumable(args, MODEL_ARGUMENTS + TEXT_ARGUMENTS, vocabulary.tokens,
                            labels=(rundir.VOCABULARY, "tokens"))
        data.check_splits([(name, split.paths) for name, split in splits.items()], args.skip_image_check,
                          args.allow_duplicates)
        cli.save_args(args, args.output_dir)
        vocabulary.save(run.vocabulary)
        tables = {name: CaptionTable(splits[name], vocabulary) for name in ("train", "val")}  # what trains
        keras.utils.set_random_seed(args.seed)
        model = build_captioner(vocabulary_size=len(vocabulary), weights=args.weights,
                                **cli.model_arguments(args, MODEL_ARGUMENTS))
        encoder, decoder = model.get_layer("encoder"), model.get_layer("decoder")

        # Phase 1: Xception frozen; the decoder learns from its features, computed once per image.
        training.set_backbone_trainable(model, BACKBONE, False)
        model.summary(print_fn=logger.info, line_length=110, expand_nested=False)
        phase1 = (None, None)
        if features.phase1_on_cache(args, run, "Xception", "image"):
            cached = cached_train_val_features(encoder, splits, run)
            phase1 = (feature_caption_batches(cached["train"], tables["train"], args.batch_size, shuffle=True, seed=args.seed),
                      feature_caption_batches(cached["val"], tables["val"], args.batch_size))
        compile_captioner(decoder, adam(trainer.learning_rate(args.learning_rate, args.epochs, phase1[0])),
                          args.jit_compile)
        best = trainer.fit(decoder, "phase1", *phase1, epochs=args.epochs, monitor="val_loss", save=model,
                           title="phase 1: Xception frozen, decoder on cached features")

        # Phase 2: from phase 1's best, Xception's top layers and the decoder trained together, from images.
        model = training.best_model(best, model)
        training.set_backbone_trainable(model, BACKBONE, True, train_batchnorm=args.train_batchnorm,
                                        top_layers=args.fine_tune_layers)
        phase2 = [image_caption_batches(splits[name], tables[name], args.image_size, args.fine_tune_batch_size,
                                shuffle=name == "train", seed=args.seed, workers=args.workers)
                  for name in ("train", "val")]
        compile_captioner(model, adam(trainer.learning_rate(args.fine_tune_learning_rate, args.fine_tune_epochs,
                                                            phase2[0])), args.jit_compile)
        best = trainer.fit(model, "phase2", *phase2, epochs=args.fine_tune_epochs, monitor="val_loss",
                           title=f"phase 2: Xception's top {args.fine_tune_layers} layers and the decoder") or best

        # Phase 3: from the best so far, the decoder trained on the CIDEr-D of its own sampled captions.
        if args.self_critical_epochs:
            model = keras.saving.load_model(best)
            encoder, decoder = model.get_layer("encoder"), model.get_layer("decoder")
            cached = cached_train_val_features(encoder, splits, run)  # after phase 2, its encoder's: computed again
            references = {name: captions.reference_texts(splits[name].captions) for name in ("train", "val")}
            batches = SelfCriticalBatches(StepDecoder(model), cached["train"], captions.CiderD(references["train"]),
                                          vocabulary, args.self_critical_batch_size, args.self_critical_samples,
                                          seed=args.seed)
            compile_self_critical(decoder, adam(args.self_critical_learning_rate), args.jit_compile)
            best = trainer.fit(
                decoder, "phase3", batches.fit_input(),
                feature_caption_batches(cached["val"], tables["val"], args.batch_size),
                epochs=args.self_critical_epochs, monitor="val_cider_d", save=model,
                callbacks=[SelfCriticalValidation(batches, cached["val"], references["val"])],
                title="phase 3: self-critical training of the decoder (CIDEr-D reward)") or best

        split = splits[data.evaluation_split(splits, args.data_dir, "Flickr8k's Flickr_8k.testImages.txt, or a "
                                             "captions_test*.json in COCO format, adds one")]
        model = keras.saving.load_model(best)
        metrics, generated = evaluate_captioner(model, vocabulary, split, args.beam_size, args.batch_size, args.workers)
        save_caption_evaluation(run, metrics, generated, split, best)


# ----------------------------------------------------------------------------- decoding

def _forbid(log_probs):
    """Log-probabilities with padding, ``<start>`` and ``<unk>`` made impossible."""
    log_probs = np.array(log_probs, dtype=np.float64)
    log_probs[:, [PAD_ID, START_ID, UNK_ID]] = -np.inf
    return log_probs


def greedy_search(step, state, batch_size, max_length):
    """Greedy decoding: the most probable next word at each step.

    Args:
        step: ``step(tokens (n,) int32, state) -> (log_probs (n, vocabulary) float, state)``,
            where ``state`` is a tuple of arrays with ``n`` rows (the LSTM's, carried between steps).
        state: the state before the first word (after the image), ``batch_size`` rows.
        batch_size: captions decoded together.
        max_length: words at most; a caption without ``<end>`` by then is returned as it is.

    Returns:
        ``(ids, log_prob)``: per caption the list of word ids (``<end>`` included when it came)
        and its total log-probability. Never padding, ``<start>`` or ``<unk>``.
    """
    tokens = np.full(batch_size, START_ID, np.int32)
    sequences = [[] for _ in range(batch_size)]
    total = np.zeros(batch_size)
    done = np.zeros(batch_size, bool)
    for _ in range(max_length):
        log_probs, state = step(tokens, state)
        log_probs = _forbid(log_probs)
        tokens = log_probs.argmax(axis=1).astype(np.int32)
        for row in np.flatnonzero(~done):
            sequences[row].append(int(tokens[row]))
            total[row] += log_probs[row, tokens[row]]
        done |= tokens == END_ID
        if done.all():
            break
    return sequences, total


def sample_search(step, state, batch_size, samples, max_length, rng):
    """Random decoding: ``samples`` captions per image, each word drawn from the decoder's
    distribution (self-critical sequence training's exploration; Rennie et al. 2017).

    Args:
        step, state, batch_size, max_length: as for ``greedy_search`` (``state`` holds one row
            per image).
        samples: captions drawn per image, >= 1.
        rng: a ``numpy.random.Generator``.

    Returns:
        ``(batch_size * samples, max_length)`` int32 word ids, image-major (``samples`` rows per
        image), each caption's words then ``<end>`` if it came within ``max_length``, then 0
        (padding). Never ``<start>`` or ``<unk>``.
    """
    rows = batch_size * samples
    state = tuple(np.repeat(np.asarray(s), samples, axis=0) for s in state)
    tokens = np.full(rows, START_ID, np.int32)
    ids = np.zeros((rows, max_length), np.int32)
    done = np.zeros(rows, bool)
    for position in range(max_length):
        log_probs, state = step(tokens, state)
        log_probs = _forbid(log_probs)
        probabilities = np.exp(log_probs - log_probs.max(axis=1, keepdims=True))
        cumulative = np.cumsum(probabilities, axis=1)
        drawn = (cumulative < (1.0 - rng.random(rows))[:, None] * cumulative[:, -1:]).sum(axis=1)  # u in (0, 1]
        tokens = np.where(done, PAD_ID, np.minimum(drawn, log_probs.shape[1] - 1)).astype(np.int32)
        ids[:, position] = tokens
        done |= tokens == END_ID
        if done.all():
            break
    return ids


def beam_search(step, state, batch_size, beam_size, max_length, length_penalty=1.0):
    """Beam search, batched over captions, length-normalised (total log-probability /
    words ** ``length_penalty``, ``<end>`` counted).

    Each caption keeps ``beam_size`` live hypotheses. A hypothesis that emits ``<end>`` among
    the ``beam_size`` best candidates of its step is set aside as ended; a caption is done
    when ``beam_size`` have ended and no live hypothesis scores better than the
    ``beam_size``-th best of them, or after ``max_length`` words. The result is the best by
    normalised score of the ended hypotheses and, at ``max_length``, the live ones (so when
    none ends, the best unfinished one). ``beam_size=1`` is greedy decoding.

    Args:
        step, state, batch_size, max_length: as for ``greedy_search``.
        beam_size: hypotheses kept per caption, >= 1.
        length_penalty: the exponent of the length normalisation, >= 0: 0 ranks by total
            log-probability (favours short captions), 1 by mean log-probability per word,
            above 1 favours longer captions still.

    Returns:
        ``(ids, score)``: per caption the chosen word ids and its normalised log-probability.
    """
    k = beam_size

    def normalised(total, words):
        return total / words ** length_penalty

    rows = np.repeat(np.arange(batch_size), k)  # hypothesis row -> caption
    state = tuple(np.asarray(s)[rows] for s in state)
    tokens = np.full(batch_size * k, START_ID, np.int32)
    scores = np.full((batch_size, k), -np.inf)
    scores[:, 0] = 0.0  # one live hypothesis at first (the others are copies)
    hypotheses = [[[] for _ in range(k)] for _ in range(batch_size)]
    ended = [[] for _ in range(batch_size)]  # (normalised score, ids)
    done = np.zeros(batch_size, bool)
    for length in range(1, max_length + 1):
        log_probs, state = step(tokens, state)
        log_probs = _forbid(log_probs)
        vocabulary = log_probs.shape[1]
        totals = (scores[:, :, None] + log_probs.reshape(batch_size, k, vocabulary)).reshape(batch_size, -1)
        order = np.argsort(-totals, axis=1, kind="stable")[:, : 2 * k]
        parents = np.tile(np.arange(k), batch_size).reshape(batch_size, k)
        new_scores = np.full((batch_size, k), -np.inf)
        new_hypotheses = [[[] for _ in range(k)] for _ in range(batch_size)]
        for caption in np.flatnonzero(~done):
            live = 0
            for rank, flat in enumerate(order[caption]):
                total = totals[caption, flat]
                if not np.isfinite(total) or live == k:
                    break
                parent, word = divmod(int(flat), vocabulary)
                words = hypotheses[caption][parent] + [word]
                if word == END_ID:
                    if rank < k:  # an ending counts only among the k best candidates
                        ended[caption].append((normalised(total, length), words))
                else:
                    parents[caption, live], new_scores[caption, live] = parent, total
                    new_hypotheses[caption][live] = words
                    live += 1
            if len(ended[caption]) >= k:  # done unless a live hypothesis still beats the k-th best ending
                kth_best = sorted((score for score, _ in ended[caption]), reverse=True)[k - 1]
                if normalised(new_scores[caption].max(), length) <= kth_best:
                    done[caption] = True
                    new_scores[caption] = -np.inf
        scores, hypotheses = new_scores, new_hypotheses
        if done.all():
            break
        gather = (np.arange(batch_size)[:, None] * k + parents).reshape(-1)
        state = tuple(np.asarray(s)[gather] for s in state)
        tokens = np.array([hypotheses[c][j][-1] if hypotheses[c][j] else START_ID
                           for c in range(batch_size) for j in range(k)], np.int32)
    results, best_scores = [], []
    for caption in range(batch_size):  # the best ending, or a live hypothesis cut at max_length if better
        candidates = ended[caption] + [(normalised(scores[caption, j], len(words)), words)
                                       for j, words in enumerate(hypotheses[caption]) if np.isfinite(scores[caption, j])]
        score, words = max(candidates, key=lambda item: item[0])
        results.append(words)
        best_scores.append(score)
    return results, np.array(best_scores)


def _jit_with_weights(function, variables, held):
    """``jax.jit(function)`` reading the weights at each call, passed as arguments
    (``keras.StatelessScope``): ``held()`` (a snapshot) when it is not ``None``, else
    ``variables``' current values. Jitted on its own, a function would keep the values it was
    traced with as constants, and go on decoding with them while the model trains
    (self-critical training samples from the decoder it updates)."""
    import jax

    def stateless(values, *args):
        with keras.StatelessScope(state_mapping=list(zip(variables, values))):
            return function(*args)

    jitted = jax.jit(stateless)
    return lambda *args: jitted(held() or [variable.value for variable in variables], *args)


class StepDecoder:
    """Step-by-step decoding with a trained captioner's layers, the LSTM state carried explicitly.

    For the attention decoder the state is ``(h, c)`` and each image's annotations and
    attention keys stay on the decoder, computed once per batch by ``start``: rows of the state
    are image-major (``C`` rows per image: 1 greedy, ``beam_size`` in beam search), which
    ``beam_search``'s per-caption reordering keeps. For show-and-tell it is ``(h, c, image)``.

    Args:
        model: a captioner from ``build_captioner`` (trained or loaded).
    """

    def __init__(self, model):
        self.encoder = model.get_layer("encoder")
        decoder = model.get_layer("decoder")
        names = {layer.name for layer in decoder.layers}
        self.lstm = decoder.get_layer("lstm")
        self.attention = isinstance(self.lstm, SoftAttentionLSTM)
        self.pre_inject = "prepend_image" in names
        self.embedding = decoder.get_layer("word_embedding")
        self.head = decoder.get_layer("next_word")
        if self.attention:
            self.annotations = decoder.get_layer("annotations")
            self.deep_hidden, self.deep_context = decoder.get_layer("deep_hidden"), decoder.get_layer("deep_context")
            start, step = self._attention_start, self._attention_step
        else:
            self.image_embedding = decoder.get_layer("image_embedding")
            self.merge = decoder.get_layer("merge_dense") if "merge_dense" in names else None
            start, step = self._start, self._step
        self._constants = ()
        if backend.is_tensorflow():  # one traced graph per call shape, not op by op
            import tensorflow as tf

            matrix, grid = tf.TensorSpec((None, None), tf.float32), tf.TensorSpec((None, None, None), tf.float32)
            ids = tf.TensorSpec((None,), tf.int32)
            start_signature = [grid if self.attention else matrix]
            step_signature = [ids, matrix, matrix] + ([grid, grid] if self.attention else [matrix])
            start = tf.function(start, input_signature=start_signature, autograph=False)
            step = tf.function(step, input_signature=step_signature, autograph=False)
        self._variables, self._held = decoder.variables, None
        if backend.name() == "jax":  # compiled once per batch shape, the weights as arguments
            start, step = (_jit_with_weights(f, self._variables, lambda: self._held) for f in (start, step))
        self._start_fn, self._step_fn = start, step

    def _start(self, image_features):
        image = self.image_embedding(image_features)
        if self.pre_inject:
            _, h, c = self.lstm(ops.expand_dims(image, 1))
        else:
            h = c = ops.zeros((ops.shape(image)[0], self.lstm.units))
        return h, c, image

    def _step(self, tokens, h, c, image):
        outputs, h, c = self.lstm(self.embedding(ops.expand_dims(tokens, 1)), initial_state=[h, c])
        outputs = outputs[:, 0]
        if self.merge is not None:
            outputs = self.merge(outputs + image)
        return ops.log(ops.maximum(self.head(outputs), 1e-30)), h, c

    def _attention_start(self, grid):
        annotations = self.annotations(grid)
        h, c, keys = self.lstm.initial_state(annotations)
        return h, c, annotations, keys

    def _attention_step(self, tokens, h, c, annotations, keys):
        words = self.embedding(tokens)
        h, c, z, alpha = self.lstm.step(words, h, c, annotations, keys)
        probabilities = self.head(words + self.deep_hidden(h) + self.deep_context(z))
        return ops.log(ops.maximum(probabilities, 1e-30)), h, c, alpha

    def snapshot(self):
        """Decodes from now on with the decoder's weights as they are now, even once a JAX
        ``model.fit`` has taken them off its variables (it keeps them in its own state between
        epochs: call its ``jax_state_sync()`` first). A no-op on the other backends, whose
        variables always hold the current weights."""
        if backend.name() == "jax":
            self._held = [variable.value for variable in self._variables]

    def graph_start(self, image_features):
        """``start`` in backend tensors, traceable: ``(state, constants)`` tuples (the attention
        decoder's per-image annotations and keys are its constants; show-and-tell has none)."""
        if self.attention:
            h, c, annotations, keys = self._attention_start(image_features)
            return (h, c), (annotations, keys)
        return tuple(self._start(image_features)), ()

    def graph_step(self, tokens, state, constants):
        """``step`` in backend tensors, traceable: ``(log_probs, state)``."""
        if self.attention:
            log_probs, h, c, _ = self._attention_step(tokens, *state, *constants)
            return log_probs, (h, c)
        log_probs, h, c = self._step(tokens, *state)
        return log_probs, (h, c, state[2])

    def start(self, image_features):
        """The state after the image, numpy arrays with one row per image: ``(h, c)`` (the
        attention decoder's annotations and keys are kept for the following steps), or
        ``(h, c, image embedding)``."""
        out = self._start_fn(ops.convert_to_tensor(image_features, "float32"))
        if self.attention:
            self._constants = out[2:]
            out = out[:2]
        return tuple(ops.convert_to_numpy(t) for t in out)

    def step(self, tokens, state):
        """``step`` of ``greedy_search`` / ``beam_search``."""
        tensors = [ops.convert_to_tensor(tokens, "int32")] + [ops.convert_to_tensor(s, "float32") for s in state[:2]]
        if self.attention:
            log_probs, h, c, _ = self._step_fn(*tensors, *self._constants)
            return ops.convert_to_numpy(log_probs), (ops.convert_to_numpy(h), ops.convert_to_numpy(c))
        log_probs, h, c = self._step_fn(*tensors, ops.convert_to_tensor(state[2], "float32"))
        return ops.convert_to_numpy(log_probs), (ops.convert_to_numpy(h), ops.convert_to_numpy(c), state[2])

    def captions(self, image_features, beam_size, max_length, batch_size=64):
        """Word ids of each image's caption: greedy for ``beam_size`` 1, else beam search.

        Args:
            image_features: ``(num_images, 2048)`` or, for attention, ``(num_images, positions,
                2048)`` float32 from the model's encoder.
        """
        found = []
        for first in range(0, len(image_features), batch_size):
            chunk = image_features[first:first + batch_size]
            state = self.start(chunk)
            if beam_size == 1:
                ids, _ = greedy_search(self.step, state, len(chunk), max_length)
            else:
                ids, _ = beam_search(self.step, state, len(chunk), beam_size, max_length)
            found += ids
        return found

    def attention_weights(self, image_features, ids):
        """Where the attention decoder looked for each word of given captions.

        Args:
            image_features: ``(num_images, positions, 2048)`` float32 grids from the encoder.
            ids: per image, the caption's word ids (``captions``' output; ``<end>`` may close it).

        Returns:
            Per image a ``(words, positions)`` float32 array, rows summing to 1: the weights the
            decoder gave each grid position while it produced each word (not ``<end>``). The
            same as during decoding: the caption's own words are fed back (teacher forcing).

        Raises:
            helpers.errors.UsageError: the model's decoder has no attention.
        """
        if not self.attention:
            raise UsageError("attention maps need a captioner trained with --decoder attention.")
        words = [[int(i) for i in caption if int(i) != END_ID] for caption in ids]
        steps = max(1, max(len(w) for w in words))
        tokens = np.zeros((len(words), steps), np.int32)
        for row, caption in enumerate(words):
            tokens[row, :len(caption)] = [START_ID] + caption[:-1] if caption else []
        _, _, alphas = self.lstm([self.embedding(ops.convert_to_tensor(tokens)),
                                  self.annotations(ops.convert_to_tensor(image_features, "float32"))])
        alphas = ops.convert_to_numpy(alphas)
        return [alphas[row, :len(caption)] for row, caption in enumerate(words)]


# ----------------------------------------------------------------------------- evaluation

ATTENTION_IN_GRID = 3  # images whose attention maps join the evaluation's captions.png


def grid_shape(model):
    """``(rows, columns)`` of an attention captioner's feature grid (10 x 10 at 299 px)."""
    return tuple(model.get_layer("encoder").get_layer(BACKBONE).output_shape[1:3])


def write_attention_maps(model, decoder, vocabulary, paths, image_features, ids, folder):
    """Writes ``folder/<image name>.png`` for each image: its caption's words and, per word, where
    the attention decoder looked (``helpers.reports.plot_attention``); returns the files. Images of
    one name in different folders get ``<name>_2.png``, ``<name>_3.png``, ..., each logged with its image.

    Args:
        decoder: the captioner's ``StepDecoder``.
        image_features: ``(num_images, positions, 2048)`` the encoder's grids of ``paths``.
        ids: per image, the caption's word ids (``StepDecoder.captions``).

    Raises:
        helpers.errors.UsageError: the captioner has no attention decoder.
    """
    shape, folder = grid_shape(model), Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written, names = [], {}
    for first in range(0, len(paths), 32):
        chunk = ids[first:first + 32]
        weights = decoder.attention_weights(image_features[first:first + 32], chunk)
        for path, words, weight in zip(paths[first:first + 32], chunk, weights):
            name, number = Path(path).stem, 1
            while name in names:  # two images of the same name in different folders: numbered, and said
                number += 1
                name = f"{Path(path).stem}_{number}"
            if number > 1:
                logger.info("attention map of %s: %s.png (%s.png is %s's)", path, name, Path(path).stem,
                            names[Path(path).stem])
            names[name] = path
            written.append(reports.plot_attention(path, vocabulary.decode(words).split(), weight, shape,
                                                  folder / f"{name}.png"))
    return written


def encode_images(model, paths, batch_size=32, workers=2, verbose=None):
    """The model's encoder output for each image file: ``(num_images, 2048)`` float32."""
    encoder = model.get_layer("encoder")
    dataset = features.ImageBatches(paths, encoder.input_shape[1], batch_size, workers=workers)
    verbose = training.progress_verbosity() if verbose is None else verbose
    return np.asarray(encoder.predict(dataset, verbose=verbose), np.float32)


def evaluate_captioner(model, vocabulary, split, beam_size=3, batch_size=64, workers=2):
    """Captions every image of ``split`` greedily and with beam search, and scores both.

    Returns:
        ``(metrics, generated)``: ``metrics`` holds ``split``, ``num_images``, ``greedy`` and
        ``beam`` (each ``captions.caption_scores`` plus ``distinct_captions``, the share of
        different captions over the images, ``vocabulary_used``, the different words they
        use, and ``bleu4_shuffled``, BLEU-4 with the images shuffled against their
        references); ``generated`` is ``{"greedy": [...], "beam": [...]}`` caption strings, and
        for an attention captioner ``"attention"``: ``(grid_shape, [(path, words, weights)])``
        for the first ``ATTENTION_IN_GRID`` images (``helpers.reports.plot_captions``).
    """
    image_features = encode_images(model, split.paths, batch_size, workers)
    decoder = StepDecoder(model)
    references = captions.reference_texts(split.captions)
    shuffled = np.random.default_rng(0).permutation(len(references))
    metrics, generated = {"split": split.name, "num_images": len(split), "beam_size": beam_size}, {}
    for name, width in (("greedy", 1), ("beam", beam_size)):
        found = decoder.captions(image_features, width, vocabulary.max_length)
        texts = [vocabulary.decode(ids) for ids in found]
        scores = captions.caption_scores(references, texts)
        scores["bleu4_shuffled"] = captions.caption_scores([references[i] for i in shuffled], texts,
                                                           meteor=False)["bleu4"]
        scores["distinct_captions"] = len(set(texts)) / len(texts)
        scores["vocabulary_used"] = len({word for text in texts for word in text.split()})
        metrics[name], generated[name] = scores, texts
        if name == "beam" and decoder.attention:  # where the beam captions of the first images looked
            ids = found[:ATTENTION_IN_GRID]
            generated["attention"] = (grid_shape(model), list(zip(
                split.paths[:ATTENTION_IN_GRID], [text.split() for text in texts[:ATTENTION_IN_GRID]],
                decoder.attention_weights(image_features[:ATTENTION_IN_GRID], ids))))
    return metrics, generated


def format_metrics(metrics):
    """The report: one line per decoding."""
    lines = [f"split: {metrics['split']} ({metrics['num_images']} images)"]
    for name in ("greedy", "beam"):
        s = metrics[name]
        label = "greedy" if name == "greedy" else f"beam {metrics['beam_size']}"
        meteor = f" METEOR {s['meteor']:.3f}" if s.get("meteor") is not None else ""
        lines.append(f"{label:>7}: BLEU-1 {s['bleu1']:.3f} BLEU-2 {s['bleu2']:.3f} BLEU-3 {s['bleu3']:.3f} "
                     f"BLEU-4 {s['bleu4']:.3f} CIDEr-D {s['cider_d']:.3f}{meteor} | distinct captions "
                     f"{100 * s['distinct_captions']:.0f}%, {s['vocabulary_used']} words, BLEU-4 on shuffled "
                     f"images {s['bleu4_shuffled']:.3f}")
    return "\n".join(lines)


def save_caption_evaluation(run, metrics, generated, split, model_path):
    """Writes ``metrics.json``, ``captions.json`` and the ``captions.png`` grid, and prints the report."""
    metrics["model"] = str(model_path)
    reports.write_json(run.metrics, metrics)
    reports.write_json(run.captions, [{"image": str(path), "greedy": g, "beam": b, "references": refs}
                                      for path, g, b, refs in zip(split.paths, generated["greedy"], generated["beam"],
                                                                  split.captions)])
    reports.plot_captions(split.paths[:12], generated["beam"][:12], [refs[0] for refs in split.captions[:12]],
                          run.captions_grid, f"{split.name}: beam {metrics['beam_size']} (top) and a reference",
                          attention=generated.get("attention"))
    print(format_metrics(metrics))
    print(f"outputs in {run.path}")


def load_captioner(path):
    """``(model, vocabulary)`` of a saved captioner and the ``vocabulary.json`` beside it.

    Raises:
        helpers.errors.UsageError: the model or vocabulary is missing, damaged or not a captioner's.
    """
    model, _ = training.load_checkpoint(path, "captioner")
    return model, captions.Vocabulary.load(rundir.vocabulary_beside(path))


def caption(model, images, beam_size=3, vocabulary=None, batch_size=32):
    """A caption for each image: the Python API the ``caption`` command prints.

    Args:
        model: a saved captioner ``.keras`` (its words from the ``vocabulary.json`` beside it)
            or a loaded captioner ``keras.Model`` (then ``vocabulary`` is required).
        images: image files (``helpers.data.read_rgb``: the reader training uses, EXIF
            orientation applied) and/or arrays ``(height, width, 3)`` RGB 0..255 of any size
            (uint8, or float in 0..255; grayscale and RGBA converted: ``data.image_array``); a
            single path or array is one image.
        beam_size: beam search width; 1 is greedy decoding.
        vocabulary: a ``helpers.captions.Vocabulary`` (default: the one beside a saved model).
        batch_size: images per forward pass of the encoder.

    Returns:
        One caption string per image: lowercase words without punctuation.

    Raises:
        helpers.errors.UsageError: a bad ``beam_size``/``batch_size``, a model that is not a
            captioner, no vocabulary; helpers.data.DatasetError: an image that cannot be read.
    """
    if beam_size < 1 or batch_size < 1:
        raise UsageError(f"beam_size and batch_size must be >= 1. Received: {beam_size}, {batch_size}")
    if isinstance(model, keras.Model):
        training.check_kind(model.name, "captioner", "the model")
        if vocabulary is None:
            raise UsageError("a loaded captioner needs its vocabulary (helpers.captions.Vocabulary.load).")
    else:
        model, saved = load_captioner(model)
        vocabulary = vocabulary or saved
    encoder = model.get_layer("encoder")
    size, images = encoder.input_shape[1], data.as_inputs(images)
    if not images:
        return []
    image_features = np.concatenate([
        encoder.predict(np.stack([data.rgb_array(item, size, f"input {first + i}")
                                  for i, item in enumerate(images[first:first + batch_size])]),
                        verbose=0) for first in range(0, len(images), batch_size)])
    ids = StepDecoder(model).captions(np.asarray(image_features, np.float32), beam_size, vocabulary.max_length)
    return [vocabulary.decode(words) for words in ids]


def evaluate(args):
    """The ``evaluate`` command: scores a saved captioner on a split (default: test)."""
    cli.check_evaluate_arguments(args)
    model, vocabulary = load_captioner(args.model)
    # Only the split scored is read: a bad caption of another split does not stop it.
    name = args.split or "test"
    splits = captions.load_caption_splits(args.data_dir, only=(name,))
    if not splits and not args.split:  # no test split: val
        name, splits = "val", captions.load_caption_splits(args.data_dir, only=("val",))
    if name not in splits:
        raise UsageError(f"{args.data_dir} has no {name} split.")
    data.check_images(splits[name].paths)
    metrics, _ = evaluate_captioner(model, vocabulary, splits[name], args.beam_size, args.batch_size)
    metrics["model"] = str(args.model)
    print(format_metrics(metrics))
    if args.json:
        reports.write_json(args.json, metrics)


def caption_command(args):
    """The ``caption`` command: prints ``<path>: <caption>`` for each image."""
    if args.batch_size < 1 or args.beam_size < 1:
        raise UsageError(f"--batch-size and --beam-size must be >= 1. Received: {args.batch_size}, {args.beam_size}")
    model, vocabulary = load_captioner(args.model)
    paths = data.image_files(args.inputs)
    data.check_images(paths)
    decoder = StepDecoder(model)
    if args.attention_maps is not None:
        if not decoder.attention:
            raise UsageError(f"--attention-maps needs a captioner trained with --decoder attention; {args.model} "
                             "is a show-and-tell captioner.")
        if args.attention_maps.exists() and not args.attention_maps.is_dir():
            raise UsageError(f"--attention-maps {args.attention_maps} is a file; give a folder (new or existing).")
        rundir.check_writable(args.attention_maps / "map.png", "--attention-maps")
    image_features = encode_images(model, paths, args.batch_size, verbose=0)  # stdout: the captions only
    ids = decoder.captions(image_features, args.beam_size, vocabulary.max_length)
    for path, words in zip(paths, ids):
        print(f"{path}: {vocabulary.decode(words)}")
    if args.attention_maps is not None:
        written = write_attention_maps(model, decoder, vocabulary, paths, image_features, ids, args.attention_maps)
        logger.info("attention maps of %d images in %s", len(written), args.attention_maps)


def export_command(args):
    """The ``export`` command: a TensorFlow SavedModel of ``--model`` that captions encoded images
    (``helpers.export.export_captioner``), with ``--beam-size`` for its ``caption`` signature.

    Raises:
        helpers.errors.UsageError: TensorFlow is not the backend, ``--output`` cannot be written,
            the model is not a captioner or has no vocabulary beside it.
    """
    from helpers import export

    if args.beam_size < 1:
        raise UsageError(f"--beam-size must be >= 1. Received: {args.beam_size}")
    backend.require_tensorflow("export (a TensorFlow SavedModel)")
    rundir.check_writable(args.output, "--output", folder=True)
    model, vocabulary = load_captioner(args.model)
    written = export.export_captioner(model, StepDecoder(model), vocabulary, args.output, args.beam_size,
                                      forbidden=(PAD_ID, START_ID, UNK_ID))
    print(f"exported {args.model} to {written}")


def main(argv=None, args=None):
    """Runs a command: ``argv`` (default: ``sys.argv[1:]``) or already parsed ``args``."""
    return cli.run(args or parse_args(argv), {"train": train, "evaluate": evaluate, "caption": caption_command,
                                              "export": export_command})


if __name__ == "__main__":
    sys.exit(main(args=ARGS))
