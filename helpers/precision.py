"""Mixed precision where it pays: the convolutional backbone, not the recurrent layers.

On a CPU with AVX512_BF16, bfloat16 speeds up Xception's forward and backward passes
(the README's Performance section has the measurements). A global ``mixed_bfloat16``
policy would also cast the LSTMs' states and gates, which accumulate their carry over
timesteps; so here only the backbone takes the mixed policy, and the recurrent layers
and the classifier keep float32 weights, states and outputs (the softmax in float32, as
the Keras mixed-precision guide asks). The classifier's LSTMs do take their matmuls in
bfloat16 then (``helpers.recurrent.FusedLSTM``'s ``matmul_dtype``), with float32 states.

``--mixed-precision`` choices: ``off`` (float32), ``bfloat16``, ``float16`` (with
loss scaling, ``keras.optimizers.LossScaleOptimizer``), and ``auto``: bfloat16 on a
GPU of compute capability 8.0 or newer, float16 on 7.x, bfloat16 on a CPU with
AVX512_BF16 or AMX (Linux ``/proc/cpuinfo``), otherwise float32.
"""

import contextlib
import logging
from pathlib import Path

import keras

from helpers import backend, options
from helpers.errors import UsageError

logger = logging.getLogger(__name__)

CHOICES = options.MIXED_PRECISION
POLICIES = {"off": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}


def cpu_supports_bfloat16(cpuinfo="/proc/cpuinfo"):
    """True when the CPU has native bfloat16 matmuls (AVX512_BF16 or AMX); False if unknown."""
    try:
        flags = Path(cpuinfo).read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def gpu_compute_capability():
    """``(major, minor)`` of the first GPU the Keras backend sees, or ``None`` without one."""
    if backend.is_tensorflow():
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        if not gpus:
            return None
        return tf.config.experimental.get_device_details(gpus[0]).get("compute_capability", (0, 0))
    if backend.name() == "jax":
        import jax

        gpus = [d for d in jax.devices() if d.platform == "gpu"]
        if not gpus:
            return None
        major, _, minor = str(getattr(gpus[0], "compute_capability", "0.0")).partition(".")
        return int(major), int(minor or 0)
    import torch

    return torch.cuda.get_device_capability(0) if torch.cuda.is_available() else None


def resolve(choice):
    """The Keras dtype policy name for a ``--mixed-precision`` choice.

    Args:
        choice: one of ``CHOICES``.

    Returns:
        ``"float32"``, ``"mixed_bfloat16"`` or ``"mixed_float16"``.

    Raises:
        UsageError: an unknown choice.
    """
    if choice not in CHOICES:
        raise UsageError(f"--mixed-precision must be one of {', '.join(CHOICES)}. Received: {choice!r}")
    capability = gpu_compute_capability()
    if choice == "auto":
        if capability is not None:
            choice = "bfloat16" if capability >= (8, 0) else "float16" if capability >= (7, 0) else "off"
        else:
            choice = "bfloat16" if cpu_supports_bfloat16() else "off"
        logger.info("--mixed-precision auto: %s for the backbone (%s)", choice,
                    f"GPU compute capability {capability}" if capability else "CPU")
    elif capability is None and choice == "float16":
        logger.warning("--mixed-precision float16 on a CPU is emulated and slower than float32; "
                       "use bfloat16 or off")
    elif capability is None and choice == "bfloat16" and not cpu_supports_bfloat16():
        logger.warning("--mixed-precision bfloat16: this CPU has no native bfloat16 (AVX512_BF16/AMX); "
                       "expect it to be slower than off")
    return POLICIES[choice]


@contextlib.contextmanager
def policy_scope(policy):
    """Layers built inside take the dtype policy ``policy`` (e.g. ``"mixed_bfloat16"``)."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def loss_scaled(model, optimizer):
    """Wraps ``optimizer`` in ``keras.optimizers.LossScaleOptimizer`` when any layer of
    ``model`` computes in float16 (bfloat16 needs no loss scaling)."""
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return optimizer
    if any(layer.dtype_policy.compute_dtype == "float16" for layer in all_layers(model)):
        return keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def all_layers(model):
    """Every layer of ``model``, nested models and wrapped layers included."""
    pending, found = [model], []
    while pending:
        layer = pending.pop()
        found.append(layer)
        pending.extend(getattr(layer, "layers", []))
        if isinstance(layer, keras.layers.Wrapper):
            pending.append(layer.layer)
    return found
