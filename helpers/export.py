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
(one image per call).

The run's ``classes.json`` is copied beside it for the class names.
"""

import logging
import shutil
import tempfile
from pathlib import Path

import keras

from helpers import backend, rundir, training
from helpers.errors import UsageError

logger = logging.getLogger(__name__)

TFLITE_FILE = "model.tflite"


def serving_model(model, preprocess=None):
    """``model`` behind its preprocessing: raw pixels in, probabilities out.

    Args:
        model: a trained ``keras.Model``.
        preprocess: a layer from raw RGB 0..255 to the model's input range (the
            classifier's ``helpers.layers.XceptionPreprocess``), or ``None`` when the
            model preprocesses inside (LRCN).

    Returns:
        A ``keras.Model`` from float32 RGB 0..255 of ``model``'s input shape to its output.
    """
    pixels = keras.Input(model.input_shape[1:], dtype="float32", name="pixels")
    outputs = model(preprocess(pixels) if preprocess is not None else pixels)
    return keras.Model(pixels, outputs, name=f"{model.name}_serving")


def export_model(model, output, export_format="saved_model", preprocess=None, classes_file=None):
    """Writes ``model`` for serving into the new folder ``output``.

    ``saved_model``: a TensorFlow SavedModel with the signatures ``serve`` (also
    ``serving_default``; float32 pixels) and ``serve_uint8`` (uint8 pixels), each
    ``(batch, *input_shape)`` RGB 0..255 -> ``(batch, num_classes)`` float32 probabilities.
    ``tflite``: ``output/model.tflite``, one float32 input ``(1, *input_shape)``: one image
    (or clip) per call. With a fixed batch of 1 the converter lowers the LSTM/GRU time
    loops to TFLite builtins; with a free batch size it keeps them as TensorFlow Select
    ops, which the TFLite interpreter of the ``tensorflow`` package cannot run. The folder
    is written under a temporary name and renamed into place, so a failed export leaves
    nothing half-written.

    Args:
        model: a trained ``keras.Model``.
        output: the folder to create; it must not exist or be empty.
        export_format: ``"saved_model"`` or ``"tflite"``.
        preprocess: as for ``serving_model``.
        classes_file: the run's ``classes.json``, copied into ``output`` when it exists.

    Returns:
        The path written: the SavedModel folder, or the ``.tflite`` file.

    Raises:
        UsageError: ``output`` exists and is not empty, or ``export_format`` is unknown.
    """
    import tensorflow as tf

    output = Path(output)
    if export_format not in ("saved_model", "tflite"):
        raise UsageError(f"--format must be saved_model or tflite. Received: {export_format!r}")
    rundir.check_writable(output, "--output", folder=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    serving = serving_model(model, preprocess)
    shape = tuple(serving.input_shape)
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=f".{output.name}.") as temporary:
        folder = Path(temporary) / "export"
        if export_format == "saved_model":
            archive = keras.export.ExportArchive()
            archive.track(serving)
            archive.add_endpoint("serve", lambda pixels: serving(pixels, training=False),
                                 input_signature=[tf.TensorSpec(shape, tf.float32, name="pixels")])
            archive.add_endpoint("serve_uint8", lambda pixels: serving(tf.cast(pixels, tf.float32), training=False),
                                 input_signature=[tf.TensorSpec(shape, tf.uint8, name="pixels")])
            archive.write_out(str(folder), verbose=False)
        else:
            folder.mkdir()
            serving.export(str(folder / TFLITE_FILE), format="litert", verbose=False,
                           input_signature=[keras.InputSpec(shape=(1, *shape[1:]), dtype="float32")])
        if classes_file is not None and Path(classes_file).is_file():
            shutil.copyfile(classes_file, folder / rundir.CLASSES)
        if output.is_dir():
            output.rmdir()
        folder.rename(output)
    written = output if export_format == "saved_model" else output / TFLITE_FILE
    logger.info("exported %s (%s, input %s float32 RGB 0..255) to %s", model.name, export_format, shape, written)
    return written


def export_command(args, kind, preprocess=None):
    """The scripts' ``export`` command: loads ``--model`` (a model of ``kind``, ``training.check_kind``)
    and writes ``--output`` in ``--format``; ``--output`` is checked before the model loads.

    Raises:
        UsageError: TensorFlow is not the backend (a SavedModel and TFLite are TensorFlow's),
            a model of another kind, an ``--output`` that cannot be written.
    """
    backend.require_tensorflow(f"export --format {args.format}")
    rundir.check_writable(args.output, "--output", folder=True)
    model, _ = training.load_checkpoint(args.model, kind)
    written = export_model(model, args.output, args.format, preprocess=preprocess,
                           classes_file=rundir.classes_beside(args.model))
    print(f"exported {args.model} to {written}")
