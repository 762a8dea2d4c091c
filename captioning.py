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
    data = cli.add_data_arguments(train_parser, require_data=False, data_help=(
        "Flickr8k (Flickr8k.token.txt, the Flickr_8k.*Images.txt split files, the images folder) or COCO "
        "captions (captions_<split>.json and the images); required unless --download"))
    data.add_argument("--download", action="store_true",
                      help="download Flickr8k once into ~/.keras/datasets and use it (needs internet) (default: off)")
    text = train_parser.add_argument_group("text")
    text.add_argument("--min-word-count", type=int, default=5,
                      help="keep words seen at least this often in the training captions (default: 5)")
    text.add_argument("--max-length", type=int, default=30,
                      help="words per caption; longer ones are cut, decoding stops there (default: 30)")
    model = train_parser.add_argument_group("model")
    cli.add_backbone_arguments(model, XCEPTION, image_size=299, fine_tune_layers=16, layer_examples="16: blocks 13-14")
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
    cli.add_performance_arguments(train_parser, distribute=("none", "multi-worker"))
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
    export_parser.add_argument("--format", choices=("saved_model", "onnx"), default="saved_model",
                               help="saved_model: image bytes in, captions out, the beam search inside; onnx: "
                               "OUTPUT/encoder.onnx and OUTPUT/decoder_step.onnx for ONNX Runtime, the word loop "
                               "the caller's (needs requirements-onnx.txt) (default: saved_model)")
    return parser.parse_args(cli.with_default_command(argv))


def _add_decoding_arguments(parser):
    parser.add_argument("--beam-size", type=int, default=3,
                        help="beam search width; 1 is greedy decoding (default: 3)")


if __name__ == "__main__":
    ARGS = cli.parse_before_backend(parse_args)

import keras  # noqa: E402
import numpy as np  # noqa: E402

from helpers import backend, captions, data, distribute, features, precision, reports, rundir, training  # noqa: E402
from helpers.attention import DoublyStochasticPenalty, SoftAttentionLSTM  # noqa: E402
from helpers.backbones import pretrained_backbone  # noqa: E402
from helpers.caption_batches import (CaptionTable, SelfCriticalBatches, SelfCriticalValidation,  # noqa: E402
                                     feature_caption_batches, image_caption_batches)
from helpers.caption_evaluation import (encode_images, evaluate_captioner, format_metrics,  # noqa: E402
                                        save_caption_evaluation, write_attention_maps)
from helpers.decoding import StepDecoder  # noqa: E402
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
    XCEPTION.check_arguments(image_size=image_size)
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


def phase1_optimizer(learning_rate):
    """Phase 1's optimizer: Adam with gradient-norm clipping at 5, usual for LSTM language
    models, its update fused (``helpers.optimizers.FusedAdam``).

    Args:
        learning_rate: a float or a schedule (``helpers.training.Trainer.learning_rate``).
    """
    return FusedAdam(learning_rate=learning_rate, clipnorm=5.0)


def fine_tune_optimizer(learning_rate):
    """Phase 2's (and phase 3's) optimizer: phase 1's, at their learning rate."""
    return phase1_optimizer(learning_rate)


def phase1_inputs(model, splits, args, trainer, tables, strategy=None):
    """``(fitted_model, train, val)`` for phase 1: the decoder, on each image's Xception features
    computed once (cached in the run, ``cached_train_val_features``) with every caption of the
    ``tables`` (``CaptionTable`` per split); ``(decoder, None, None)`` when phase 1 does not train.
    Under ``--distribute multi-worker``, each process encodes its share of the images and feeds its
    slice of every global batch (``helpers.distribute``)."""
    decoder = model.get_layer("decoder")
    if not features.phase1_on_cache(trainer, "Xception", "image", args.epochs):
        return decoder, None, None
    cached = cached_train_val_features(model.get_layer("encoder"), splits, trainer.run, strategy)
    return (decoder, *distribute.process_slices(strategy, {
        "train": feature_caption_batches(cached["train"], tables["train"], args.batch_size, shuffle=True,
                                         seed=args.seed),
        "val": feature_caption_batches(cached["val"], tables["val"], args.batch_size)}, args.batch_size))


def training_data(splits, args, batch_size, tables, strategy=None):
    """``(train, val)`` from the images (phase 2): each image with one of its captions
    (``image_caption_batches``); under ``--distribute multi-worker``, each process's slices."""
    return distribute.process_slices(strategy, {
        name: image_caption_batches(splits[name], tables[name], args.image_size, batch_size, shuffle=name == "train",
                                    seed=args.seed, workers=args.workers)
        for name in ("train", "val")}, batch_size)


def cached_train_val_features(encoder, splits, run, strategy=None):
    """``{"train": ..., "val": ...}``: the encoder's features of those splits' images from the run's
    cache (``helpers.features``), computed once; an attention encoder's grids in float16 on disk."""
    grid = len(encoder.output_shape) == 3  # (positions, 2048)
    return {name: features.cached_features(encoder, splits[name].paths, run.features, name,
                                           dtype="float16" if grid else "float32", strategy=strategy)
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
    cli.check_backbone_arguments(XCEPTION, args.image_size, args.fine_tune_layers)
    with cli.in_flag_words(TEXT_ARGUMENTS):
        captions.check_text_arguments(args.min_word_count, args.max_length)
    for flag, value, ok, wanted in (
            ("--beam-size", args.beam_size, args.beam_size >= 1, ">= 1"),
            ("--self-critical-epochs", args.self_critical_epochs, args.self_critical_epochs >= 0, ">= 0"),
            ("--self-critical-batch-size", args.self_critical_batch_size, args.self_critical_batch_size >= 1, ">= 1"),
            ("--self-critical-samples", args.self_critical_samples,
             2 <= args.self_critical_samples <= MAX_SELF_CRITICAL_SAMPLES, f"in [2, {MAX_SELF_CRITICAL_SAMPLES}]"),
            ("--self-critical-learning-rate", args.self_critical_learning_rate,
             0 < args.self_critical_learning_rate < float("inf"), "a positive number")):
        if not ok:
            raise UsageError(f"{flag} must be {wanted}. Received: {flag} {value}")
    if args.distribute == "multi-worker" and backend.is_tensorflow():
        raise UsageError("--distribute multi-worker trains the captioner across processes on JAX (KERAS_BACKEND=jax); "
                         "on TensorFlow it trains on one device.")
    if args.distribute == "multi-worker" and args.self_critical_epochs:
        raise UsageError("--self-critical-epochs: phase 3 samples captions on one process; train phases 1 and 2 with "
                         "--distribute multi-worker, then run the same command with --distribute none "
                         "--self-critical-epochs N on the chief's machine (it resumes at phase 3).")
    if args.decoder == "attention" and args.inject is not None:
        raise UsageError("--inject is show-and-tell's choice; the attention decoder reads the image at every word. "
                         f"Received: --decoder attention --inject {args.inject}")
    args.inject = args.inject or "pre"
    splits, vocabulary = load_data(args)
    with cli.in_flag_words(MODEL_ARGUMENTS):
        check_model_arguments(vocabulary_size=len(vocabulary), **cli.model_arguments(
            args, [name for name in MODEL_ARGUMENTS if name != "mixed_precision"]))
    strategy = distribute.training_strategy(args.distribute, args.devices, args.batch_size,
                                             args.fine_tune_batch_size)
    with training.Trainer(args.output_dir, strategy, **cli.trainer_arguments(args)) as trainer:
        run = trainer.run
        cli.check_resumable(args, MODEL_ARGUMENTS + TEXT_ARGUMENTS, vocabulary.tokens,
                            labels=(rundir.VOCABULARY, "tokens"))
        data.check_splits([(name, split.paths) for name, split in splits.items()], args.skip_image_check,
                          args.allow_duplicates)
        if trainer.chief:
            cli.save_args(args, args.output_dir)
            vocabulary.save(run.vocabulary)
        tables = {name: CaptionTable(splits[name], vocabulary) for name in ("train", "val")}  # what trains
        keras.utils.set_random_seed(args.seed)
        with trainer.scope():
            model = build_captioner(vocabulary_size=len(vocabulary), weights=args.weights,
                                    **cli.model_arguments(args, MODEL_ARGUMENTS))

            # Phase 1: Xception frozen; the decoder learns from its features, computed once per image.
            training.set_backbone_trainable(model, BACKBONE, False)
            model.summary(print_fn=logger.info, line_length=110, expand_nested=False)
            fitted, train_data, val_data = phase1_inputs(model, splits, args, trainer, tables, strategy)
            compile_captioner(fitted, phase1_optimizer(trainer.learning_rate(args.learning_rate, args.epochs,
                                                                             train_data)), args.jit_compile)
            best = trainer.fit(fitted, "phase1", train_data, val_data, epochs=args.epochs, monitor="val_loss",
                               save=model, title="phase 1: Xception frozen, decoder on cached features")

            # Phase 2: from phase 1's best, Xception's top layers and the decoder trained together, from images.
            model = training.best_model(best, model)
            training.set_backbone_trainable(model, BACKBONE, True, train_batchnorm=args.train_batchnorm,
                                            top_layers=args.fine_tune_layers)
            train_data, val_data = training_data(splits, args, args.fine_tune_batch_size, tables, strategy)
            compile_captioner(model, fine_tune_optimizer(trainer.learning_rate(
                args.fine_tune_learning_rate, args.fine_tune_epochs, train_data)), args.jit_compile)
            best = trainer.fit(model, "phase2", train_data, val_data, epochs=args.fine_tune_epochs,
                               monitor="val_loss",
                               title=f"phase 2: Xception's top {args.fine_tune_layers} layers and the decoder") or best

        if not trainer.chief:  # the chief evaluates
            distribute.cleanup(strategy, args.output_dir)
            return 0

        # Phase 3: from the best so far, the decoder trained on the CIDEr-D of its own sampled captions.
        if args.self_critical_epochs:
            model = keras.saving.load_model(best)
            encoder, decoder = model.get_layer("encoder"), model.get_layer("decoder")
            cached = cached_train_val_features(encoder, splits, run)  # after phase 2, its encoder's: computed again
            references = {name: captions.reference_texts(splits[name].captions) for name in ("train", "val")}
            batches = SelfCriticalBatches(StepDecoder(model), cached["train"], captions.CiderD(references["train"]),
                                          vocabulary, args.self_critical_batch_size, args.self_critical_samples,
                                          seed=args.seed)
            compile_self_critical(decoder, fine_tune_optimizer(args.self_critical_learning_rate), args.jit_compile)
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
    cli.check_evaluate_arguments(args.batch_size, args.json, args.beam_size)
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
    (``helpers.export.export_captioner``), with ``--beam-size`` for its ``caption`` signature; or,
    with ``--format onnx``, its encoder and one decoder step for ONNX Runtime
    (``helpers.export.export_captioner_onnx``).

    Raises:
        helpers.errors.UsageError: TensorFlow is not the backend, ``--output`` cannot be written,
            the model is not a captioner or has no vocabulary beside it.
    """
    from helpers import export

    if args.beam_size < 1:
        raise UsageError(f"--beam-size must be >= 1. Received: {args.beam_size}")
    if args.format == "onnx":
        export.check_onnx_export()
    backend.require_tensorflow(f"export --format {args.format}")
    rundir.check_writable(args.output, "--output", folder=True)
    model, vocabulary = load_captioner(args.model)
    if args.format == "onnx":
        written = export.export_captioner_onnx(model, StepDecoder(model), vocabulary, args.output)
    else:
        written = export.export_captioner(model, StepDecoder(model), vocabulary, args.output, args.beam_size)
    print(f"exported {args.model} to {written}")


def main(argv=None, args=None):
    """Runs a command: ``argv`` (default: ``sys.argv[1:]``) or already parsed ``args``."""
    return cli.run(args or parse_args(argv), {"train": train, "evaluate": evaluate, "caption": caption_command,
                                              "export": export_command})


if __name__ == "__main__":
    sys.exit(main(args=ARGS))
