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


def jit_compile(flag):
    """``Model.compile``'s ``jit_compile`` for ``--jit-compile``: XLA on TensorFlow only when
    asked (it measured slower on a CPU); on JAX every step is compiled by XLA anyway and on
    PyTorch Keras' own choice holds (``"auto"``)."""
    return bool(flag) if is_tensorflow() else "auto"
