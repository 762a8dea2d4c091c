"""The seam between backend-neutral Keras 3 code and what only TensorFlow has.

Model code is Keras 3 (``keras.ops``, Keras layers) and runs on the TensorFlow, JAX and
PyTorch backends (``KERAS_BACKEND``; TensorFlow is the default). What is TensorFlow's alone is
used only where TensorFlow is the backend (``is_tensorflow``): ``tf.data`` input pipelines, the
fused CPU kernels (``helpers.recurrent.FusedLSTM``, ``helpers.optimizers.FusedAdam``, which
defer to Keras' own ``LSTM``/``Adam`` elsewhere), ``tf.distribute`` and the SavedModel/TFLite
export; TensorBoard event files need TensorFlow installed (``has_tensorflow``). Every module that
needs TensorFlow imports it inside the function that uses it, never at the top, so a Python
environment without TensorFlow (``requirements-jax.txt``) imports the whole project.

``tensorflow()`` returns the ``tensorflow`` module when it is installed; ``require_tensorflow``
refuses in one line what needs it.
"""

import importlib.util
import sys

import keras

from helpers.errors import UsageError


def name():
    """The Keras backend: ``"tensorflow"``, ``"jax"`` or ``"torch"``."""
    return keras.backend.backend()


def is_tensorflow():
    """True when Keras runs on TensorFlow (the default backend)."""
    return name() == "tensorflow"


def has_tensorflow():
    """True when the ``tensorflow`` package is installed (whatever the backend)."""
    if "tensorflow" in sys.modules:
        return True
    try:
        return importlib.util.find_spec("tensorflow") is not None
    except ImportError:  # an import hook that hides it
        return False


def require_tensorflow(what, backend=True):
    """Refuses in one line something TensorFlow alone does.

    Args:
        what: the flag or feature, for the message (``"--distribute mirrored"``).
        backend: it needs TensorFlow as the Keras backend (``KERAS_BACKEND=tensorflow``), not
            only installed.

    Raises:
        UsageError: naming ``what`` and the backend, or that TensorFlow is not installed.
    """
    if backend and not is_tensorflow():
        raise UsageError(f"{what} needs the TensorFlow backend; this run is on {name()} "
                         f"(KERAS_BACKEND={name()}); run it with KERAS_BACKEND=tensorflow.")
    if not has_tensorflow():
        raise UsageError(f"{what} needs TensorFlow, which this Python environment does not have "
                         "(pip install -r requirements.txt).")


def tensorflow():
    """The ``tensorflow`` module (imported on first use), or ``None`` where it is not installed."""
    if not has_tensorflow():
        return None
    import tensorflow as tf

    return tf


def is_tf_dataset(data):
    """True for a ``tf.data.Dataset``; never imports TensorFlow (a dataset exists only once it has been)."""
    tf = sys.modules.get("tensorflow")
    return tf is not None and isinstance(data, tf.data.Dataset)


def tf_dataset_with_free_shapes(batches, signature, prefetch=2):
    """A ``keras.utils.PyDataset`` read through ``tf.data`` with its tensor shapes declared
    (``signature``: ``tf.TensorSpec``s, ``None`` on the axes that vary between batches). Keras on
    TensorFlow otherwise fixes a PyDataset's shapes from its first two batches and then refuses
    a batch whose caption or clip length differs. Each full pass ends with ``on_epoch_end`` (the
    dataset's reshuffle); ``prefetch`` batches are prepared ahead (0: each when the train step
    asks for it). TensorFlow backend only."""
    import tensorflow as tf

    def generate():
        for index in range(len(batches)):
            yield batches[index]
        batches.on_epoch_end()

    dataset = tf.data.Dataset.from_generator(generate, output_signature=signature).apply(
        tf.data.experimental.assert_cardinality(len(batches)))
    if prefetch:
        return dataset.prefetch(prefetch)
    options = tf.data.Options()
    options.experimental_optimization.inject_prefetch = False  # tf.data would add one of its own
    return dataset.with_options(options)


def jit_compile(flag):
    """``Model.compile``'s ``jit_compile`` for ``--jit-compile``: XLA on TensorFlow only when
    asked (it measured slower on a CPU); on JAX every step is compiled by XLA anyway and on
    PyTorch Keras' own choice holds (``"auto"``)."""
    return bool(flag) if is_tensorflow() else "auto"
