"""Export of a trained model for serving, loadable with TensorFlow alone.

``export_model`` writes a TensorFlow SavedModel with Keras 3's export API
(``keras.export.ExportArchive``, which ``Model.export`` wraps) or a TFLite flat buffer
(``Model.export(format="litert")``). Both take raw RGB pixels 0..255 at the model's
size, with the model's preprocessing inside, and return class probabilities, so a
server needs neither this repository nor Keras::

    import tensorflow as tf
    served = tf.saved_model.load("export_dir")
    probabilities = served.serve(pixels)        # float32 (batch, 299, 299, 3), 0..255
    probabilities = served.serve_uint8(pixels)  # uint8, same shape

or, for ``--format tflite``, ``tf.lite.Interpreter(model_path="export_dir/model.tflite")``
(one image per call), or, for ``--format onnx``, ONNX Runtime, with neither TensorFlow nor Keras::

    import onnxruntime
    session = onnxruntime.InferenceSession("export_dir/model.onnx")
    probabilities = session.run(None, {"pixels": pixels})[0]   # float32 (batch, 299, 299, 3), 0..255

The run's ``classes.json`` is copied beside it for the class names.
"""

import logging
import shutil
import tempfile
from pathlib import Path

import keras
import numpy as np

from helpers import backend, decoding, options, rundir, training
from helpers.captions import END_ID, PAD_ID, START_ID
from helpers.errors import UsageError

logger = logging.getLogger(__name__)

TFLITE_FILE = "model.tflite"
ONNX_FILE = "model.onnx"
ONNX_REQUIREMENTS = "requirements-onnx.txt"  # tf2onnx and onnx (the export), onnxruntime (serving)


def check_onnx_export():
    """Refuses in one line an ONNX export this environment cannot write: Keras converts the
    model's TensorFlow graph with tf2onnx, so it needs the TensorFlow backend, tf2onnx and onnx.

    Raises:
        UsageError: naming what is missing and the requirements file that adds it.
    """
    import importlib.util

    if not backend.is_tensorflow():
        raise UsageError(f"export --format onnx converts the model's TensorFlow graph (tf2onnx): run it with "
                         f"KERAS_BACKEND=tensorflow after pip install -r requirements.txt -r {ONNX_REQUIREMENTS} "
                         f"(a checkpoint trained on {backend.name()} loads there); this run is on {backend.name()}.")
    missing = [name for name in ("tf2onnx", "onnx") if importlib.util.find_spec(name) is None]
    if missing:
        raise UsageError(f"export --format onnx needs {' and '.join(missing)}, which this Python environment does "
                         f"not have: pip install -r {ONNX_REQUIREMENTS}")


def serving_model(model, preprocess=None):
    """``model`` behind its preprocessing: raw pixels in, probabilities out.

    Args:
        model: a trained ``keras.Model``.
        preprocess: a layer from raw RGB 0..255 to the model's input range (the
            classifier's ``helpers.layers.XceptionPreprocess``), or ``None`` when the
            model preprocesses inside (LRCN).

    Returns:
        A ``keras.Model`` from float32 RGB 0..255 of ``model``'s input shape to its output; for a
        model on feature clips (input ``(batch, frames, features)``: the LRCN's head alone) from
        those features, its input named ``features``.
    """
    pixels = keras.Input(model.input_shape[1:], dtype="float32", name=input_name(model))
    outputs = model(preprocess(pixels) if preprocess is not None else pixels)
    return keras.Model(pixels, outputs, name=f"{model.name}_serving")


def input_name(model):
    """``"features"`` for a model on feature clips (``sequences.feature_width``), else ``"pixels"``."""
    from helpers import sequences

    return "features" if sequences.feature_width(model) else "pixels"


def export_model(model, output, export_format="saved_model", preprocess=None, classes_file=None):
    """Writes ``model`` for serving into the new folder ``output``.

    ``saved_model``: a TensorFlow SavedModel with the signatures ``serve`` (also
    ``serving_default``; float32 pixels) and ``serve_uint8`` (uint8 pixels), each
    ``(batch, *input_shape)`` RGB 0..255 -> ``(batch, num_classes)`` float32 probabilities.
    A model on feature clips gets ``serve`` alone: float32 ``(batch, frames, features)``
    named ``features`` (padded frames all -1, masked, as in training).
    ``onnx``: ``output/model.onnx`` (tf2onnx through ``Model.export(format="onnx")``), one
    float32 input ``pixels`` (or ``features``) ``(batch, *input_shape)`` with a free batch size
    (and a free frame count where the model has one), the probabilities out; served by ONNX
    Runtime without TensorFlow or Keras.
    ``tflite``: ``output/model.tflite``, one float32 input ``(1, *input_shape)``: one image
    (or clip) per call. With a fixed batch of 1 the converter lowers the LSTM/GRU time
    loops to TFLite builtins; with a free batch size it keeps them as TensorFlow Select
    ops, which the TFLite interpreter of the ``tensorflow`` package cannot run. The folder
    is written under a temporary name and renamed into place, so a failed export leaves
    nothing half-written.

    Args:
        model: a trained ``keras.Model``.
        output: the folder to create; it must not exist or be empty.
        export_format: ``"saved_model"``, ``"tflite"`` or ``"onnx"``.
        preprocess: as for ``serving_model``.
        classes_file: the run's ``classes.json``, copied into ``output`` when it exists.

    Returns:
        The path written: the SavedModel folder, or the ``.tflite`` or ``.onnx`` file.

    Raises:
        UsageError: ``output`` exists and is not empty, ``export_format`` is unknown, or ONNX
            export's packages are missing (``check_onnx_export``).
    """
    import tensorflow as tf

    output = Path(output)
    if export_format not in options.EXPORT_FORMATS:
        raise UsageError(f"--format must be one of {', '.join(options.EXPORT_FORMATS)}. Received: {export_format!r}")
    if export_format == "onnx":
        check_onnx_export()
    rundir.check_writable(output, "--output", folder=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    serving = serving_model(model, preprocess)
    shape = tuple(serving.input_shape)
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=f".{output.name}.") as temporary:
        folder = Path(temporary) / "export"
        if export_format == "saved_model":
            archive = keras.export.ExportArchive()
            archive.track(serving)
            name = input_name(model)
            archive.add_endpoint("serve", lambda pixels: serving(pixels, training=False),
                                 input_signature=[tf.TensorSpec(shape, tf.float32, name=name)])
            if name == "pixels":
                archive.add_endpoint("serve_uint8", lambda pixels: serving(tf.cast(pixels, tf.float32),
                                                                           training=False),
                                     input_signature=[tf.TensorSpec(shape, tf.uint8, name="pixels")])
            archive.write_out(str(folder), verbose=False)
        elif export_format == "onnx":
            folder.mkdir()
            serving.export(str(folder / ONNX_FILE), format="onnx", verbose=False,
                           input_signature=[keras.InputSpec(shape=shape, dtype="float32", name=input_name(model))])
        else:
            folder.mkdir()
            serving.export(str(folder / TFLITE_FILE), format="litert", verbose=False,
                           input_signature=[keras.InputSpec(shape=(1, *shape[1:]), dtype="float32")])
        if classes_file is not None and Path(classes_file).is_file():
            shutil.copyfile(classes_file, folder / rundir.CLASSES)
        if output.is_dir():
            output.rmdir()
        folder.rename(output)
    written = {"saved_model": output, "tflite": output / TFLITE_FILE, "onnx": output / ONNX_FILE}[export_format]
    logger.info("exported %s (%s, input %s float32 %s) to %s", model.name, export_format, shape,
                "features" if input_name(model) == "features" else "RGB 0..255", written)
    return written


def export_command(args, kind, preprocess=None, transform=None):
    """The scripts' ``export`` command: loads ``--model`` (a model of ``kind``, ``training.check_kind``),
    ``transform(model)`` when given (the classifier's ``--tta``), and writes ``--output`` in
    ``--format``; ``--output`` is checked before the model loads.

    Raises:
        UsageError: TensorFlow is not the backend (a SavedModel and TFLite are TensorFlow's),
            a model of another kind, an ``--output`` that cannot be written.
    """
    if args.format == "onnx":
        check_onnx_export()
    backend.require_tensorflow(f"export --format {args.format}")
    rundir.check_writable(args.output, "--output", folder=True)
    model, _ = training.load_checkpoint(args.model, kind)
    if transform is not None:
        model = transform(model)
    written = export_model(model, args.output, args.format, preprocess=preprocess,
                           classes_file=rundir.classes_beside(args.model))
    print(f"exported {args.model} to {written}")


# ----------------------------------------------------------------------------- captioner

CAPTION_ENDPOINTS = ("caption", "caption_greedy")


def graph_read_image(encoded, image_size):
    """``helpers.data.read_rgb`` in TensorFlow ops, for a server: one encoded JPEG/PNG/GIF/BMP
    (a scalar ``tf.string``) -> ``(image_size, image_size, 3)`` float32 RGB 0..255.

    As PIL does it: JPEG decoded with the accurate integer IDCT, a grayscale or RGBA file
    made RGB, a bilinear resize with antialiasing (PIL's filter when shrinking) to the
    square in PIL's two passes (width, then height), each rounded to 8 bits as PIL rounds. Not applied: the EXIF
    orientation tag, which ``read_rgb`` follows (a sideways phone photo is captioned sideways).
    A 16-bit PNG is refused (``tf.errors.InvalidArgumentError``), as ``read_rgb`` refuses it.
    """
    import tensorflow as tf

    # A 16-bit PNG (bit depth, byte 24 of the file, is 16) is refused, as read_rgb refuses it:
    # decode_image would scale it to 8 bits where the Python API asks the user to convert it.
    header = tf.strings.join([encoded, tf.constant(b"\0" * 25)])  # short input: no out-of-range read
    wide = tf.logical_and(tf.equal(tf.strings.substr(header, 0, 4), b"\x89PNG"),
                          tf.equal(tf.strings.substr(header, 24, 1), b"\x10"))
    with tf.control_dependencies([tf.debugging.Assert(tf.logical_not(wide), [
            "a 16-bit PNG; convert it to 8 bits per channel (the Python API refuses it too)"])]):
        encoded = tf.identity(encoded)
    image = tf.cond(tf.io.is_jpeg(encoded),
                    lambda: tf.io.decode_jpeg(encoded, channels=3, dct_method="INTEGER_ACCURATE"),
                    lambda: tf.io.decode_image(encoded, channels=3, expand_animations=False))
    # PIL resizes 8-bit images in two passes, width then height, rounding to 8 bits after each.
    height = tf.shape(image)[0]
    image = tf.image.resize(tf.cast(image, tf.float32), [height, image_size], method="bilinear", antialias=True)
    image = tf.clip_by_value(tf.round(image), 0.0, 255.0)
    image = tf.image.resize(image, [image_size, image_size], method="bilinear", antialias=True)
    return tf.clip_by_value(tf.round(image), 0.0, 255.0)


def graph_decode(ids, tokens):
    """``helpers.captions.Vocabulary.decode`` in TensorFlow ops: ``(images, steps)`` int32 word ids
    -> ``(images,)`` ``tf.string`` captions, the words up to ``<end>`` joined by spaces."""
    import tensorflow as tf

    before_end = tf.equal(tf.cumsum(tf.cast(tf.equal(ids, END_ID), tf.int32), axis=1), 0)
    keep = before_end & tf.not_equal(ids, PAD_ID) & tf.not_equal(ids, START_ID)
    words = tf.ragged.boolean_mask(tf.gather(tf.constant(tokens), ids), keep)
    return tf.strings.reduce_join(words, axis=1, separator=" ")


def export_captioner(model, decoder, vocabulary, output, beam_size=3):
    """Writes a captioner as a TensorFlow SavedModel that captions encoded images, into the new
    folder ``output`` (written under a temporary name and renamed into place).

    Its signatures take ``(batch,)`` ``tf.string`` encoded images (JPEG, PNG, GIF or BMP files'
    bytes) and return ``(batch,)`` ``tf.string`` captions (lowercase words, no punctuation):
    ``caption`` (also ``serving_default``) by beam search of width ``beam_size``, and
    ``caption_greedy``. Reading the image (``graph_read_image``), the encoder, the search
    (``helpers.decoding.beam_search``, the one ``caption()`` runs) and the words (``graph_decode``)
    are all in the graph::

        served = tf.saved_model.load("export_dir")
        captions = served.caption(tf.constant([open("photo.jpg", "rb").read()]))

    Args:
        model: a captioner (``captioning.build_captioner``).
        decoder: its ``helpers.decoding.StepDecoder``.
        vocabulary: its ``helpers.captions.Vocabulary`` (copied in as ``vocabulary.json``).
        output: the folder to create; it must not exist or be empty.
        beam_size: the ``caption`` signature's beam width (``caption_greedy``'s is 1).

    Returns:
        The folder written.

    Raises:
        UsageError: ``output`` exists and is not empty.
    """
    import tensorflow as tf

    output = Path(output)
    rundir.check_writable(output, "--output", folder=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    encoder = model.get_layer("encoder")
    size = encoder.input_shape[1]

    def captions(images, width):
        pixels = tf.map_fn(lambda encoded: graph_read_image(encoded, size), images,
                           fn_output_signature=tf.TensorSpec((size, size, 3), tf.float32))
        ids, _ = decoding.beam_search(decoder.graph_start, decoder.graph_step, encoder(pixels, training=False),
                                      width, vocabulary.max_length)
        return graph_decode(ids, vocabulary.tokens)

    signature = [tf.TensorSpec((None,), tf.string, name="images")]
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=f".{output.name}.") as temporary:
        folder = Path(temporary) / "export"
        archive = keras.export.ExportArchive()
        archive.track(model)
        archive.add_endpoint("caption", lambda images: captions(images, beam_size), input_signature=signature)
        archive.add_endpoint("caption_greedy", lambda images: captions(images, 1), input_signature=signature)
        archive.write_out(str(folder), verbose=False)
        vocabulary.save(folder / rundir.VOCABULARY)
        if output.is_dir():
            output.rmdir()
        folder.rename(output)
    logger.info("exported the captioner (encoded images in, captions out; beam %d and greedy) to %s", beam_size, output)
    return output


ENCODER_ONNX, DECODER_STEP_ONNX = "encoder.onnx", "decoder_step.onnx"


class _DecoderStep(keras.Model):
    """One decoding step of a captioner as a model (``StepDecoder.graph_step``), for ONNX:
    inputs ``[tokens, h, c, *image]`` (``image``: show-and-tell's image embedding, or the
    attention decoder's annotations and keys), outputs ``(log_probs, h, c)``."""

    def __init__(self, decoder):
        super().__init__(name="decoder_step")
        self.decoder = decoder
        self.parts = [layer for layer in (decoder.lstm, decoder.embedding, decoder.head, getattr(decoder, "merge", None),
                                          getattr(decoder, "deep_hidden", None), getattr(decoder, "deep_context", None))
                      if layer is not None]  # tracked: their weights are the step's

    def call(self, inputs):
        tokens, h, c, *image = inputs
        if self.decoder.attention:
            log_probs, (h, c) = self.decoder.graph_step(tokens, (h, c), tuple(image))
        else:
            log_probs, (h, c, _) = self.decoder.graph_step(tokens, (h, c, image[0]), ())
        return log_probs, h, c


class _DecoderStart(keras.Model):
    """The encoder and the decoder's first state (``StepDecoder.graph_start``) as one model:
    pixels in, ``(h, c, *image)`` out."""

    def __init__(self, encoder, decoder):
        super().__init__(name="encoder")
        self.encoder, self.decoder = encoder, decoder

    def call(self, pixels):
        state, constants = self.decoder.graph_start(self.encoder(pixels, training=False))
        return (*state[:2], *(constants if self.decoder.attention else state[2:]))


def export_captioner_onnx(model, decoder, vocabulary, output):
    """Writes a captioner for ONNX Runtime into the new folder ``output``: the encoder and one
    decoder step, with ``vocabulary.json``; the search over words is the caller's loop (the
    SavedModel, ``export_captioner``, holds the beam search; its image decoding and string ops
    have no ONNX form).

    - ``encoder.onnx``: ``pixels`` ``(batch, size, size, 3)`` float32 RGB 0..255 (upright,
      squashed to the model's size) -> the decoder's first state ``h``, ``c`` ``(batch, units)``
      and the image's tensors the steps read: show-and-tell's ``image`` ``(batch,
      embedding_dim)``, or the attention decoder's ``annotations`` and ``keys`` ``(batch,
      positions, attention_dim)``.
    - ``decoder_step.onnx``: ``tokens`` ``(rows,)`` int32 (``<start>``, 2, first), ``h``, ``c``
      and the image's tensors, one row per caption -> ``log_probs`` ``(rows, vocabulary)``,
      ``h``, ``c``, in that order. Greedy decoding: feed the argmax back, never taking padding,
      ``<start>`` or ``<unk>`` (ids 0, 2, 1), until ``<end>`` (3) or ``vocabulary.max_length``
      words (tested to give ``caption(beam_size=1)``'s captions).

    Args:
        model: a captioner (``captioning.build_captioner``); decoder: its
            ``helpers.decoding.StepDecoder``; vocabulary: its ``helpers.captions.Vocabulary``.
        output: the folder to create; it must not exist or be empty.

    Returns:
        The folder written.

    Raises:
        UsageError: ``output`` exists and is not empty, or ONNX export's packages are missing.
    """
    check_onnx_export()
    output = Path(output)
    rundir.check_writable(output, "--output", folder=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    encoder = model.get_layer("encoder")
    size = encoder.input_shape[1]
    start, step = _DecoderStart(encoder, decoder), _DecoderStep(decoder)
    pixels = np.zeros((1, size, size, 3), np.float32)
    first = [keras.ops.convert_to_numpy(t) for t in start(pixels)]  # builds both, and gives the shapes
    step([np.full(1, START_ID, np.int32), *first])
    names = ["h", "c", *(["annotations", "keys"] if decoder.attention else ["image"])]
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=f".{output.name}.") as temporary:
        folder = Path(temporary) / "export"
        folder.mkdir()
        start.export(str(folder / ENCODER_ONNX), format="onnx", verbose=False,
                     input_signature=[keras.InputSpec(shape=(None, size, size, 3), dtype="float32", name="pixels")])
        specs = [keras.InputSpec(shape=(None,), dtype="int32", name="tokens")] + [
            keras.InputSpec(shape=(None, *tensor.shape[1:]), dtype="float32", name=name)
            for name, tensor in zip(names, first)]
        step.export(str(folder / DECODER_STEP_ONNX), format="onnx", verbose=False, input_signature=[specs])
        vocabulary.save(folder / rundir.VOCABULARY)
        if output.is_dir():
            output.rmdir()
        folder.rename(output)
    logger.info("exported the captioner for ONNX Runtime (%s, %s) to %s", ENCODER_ONNX, DECODER_STEP_ONNX, output)
    return output
