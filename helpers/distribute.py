"""Data-parallel training through ``tf.distribute``.

``--distribute mirrored`` trains with ``tf.distribute.MirroredStrategy`` over all
local GPUs (or the devices given with ``--devices``): one process, one model replica
per device, gradients all-reduced every step, through ``model.fit`` (checkpoints,
logs, progress bar and ``BackupAndRestore`` as without it). ``--batch-size`` and
``--fine-tune-batch-size`` are global batches, split evenly over the replicas; they
must be divisible by the number of replicas.

Scaling the learning rate: with N replicas and the global batch N times the
single-device batch, the usual starting point is N times the learning rate (the
linear scaling rule, Goyal et al. 2017), with a few epochs of warm-up when N is
large; keeping the global batch and the learning rate unchanged gives the
single-device result (tested).
"""

import contextlib
import logging

import keras

from helpers import backend, multiworker, options
from helpers.errors import UsageError

logger = logging.getLogger(__name__)

CHOICES = options.DISTRIBUTE


def make_strategy(choice, devices=None):
    """The ``tf.distribute`` strategy for ``--distribute``, or ``None`` for ``none``;
    ``multi-worker`` is ``MultiWorkerMirroredStrategy`` (``helpers.multiworker``).

    Args:
        choice: one of ``CHOICES``.
        devices: device names for ``mirrored`` (e.g. ``["/gpu:0", "/gpu:1"]``);
            default: all local GPUs, else the CPU.

    Raises:
        UsageError: an unknown choice, ``devices`` without ``mirrored``, a device
            that does not exist (the visible devices are listed), or a bad ``TF_CONFIG``
            for ``multi-worker`` (``helpers.multiworker.read_tf_config``).
    """
    if choice not in CHOICES:
        raise UsageError(f"--distribute must be one of {', '.join(CHOICES)}. Received: {choice!r}")
    if devices and choice != "mirrored":
        raise UsageError("--devices needs --distribute mirrored.")
    if choice == "none":
        return None
    if not backend.is_tensorflow():
        if choice == "multi-worker":
            backend.require_tensorflow("--distribute multi-worker")
        return KerasDataParallel(devices)
    if choice == "multi-worker":
        return multiworker.make_strategy()
    import tensorflow as tf

    if devices:
        visible = [device.name for device in tf.config.list_logical_devices()]
        wanted = [_canonical(name) for name in devices]
        unknown = [name for name, canonical in zip(devices, wanted) if canonical not in visible]
        if unknown:
            raise UsageError(f"--devices {' '.join(unknown)}: no such device; visible: {' '.join(visible)}")
        devices = wanted
    strategy = tf.distribute.MirroredStrategy(devices or None)
    logger.info("MirroredStrategy over %d replica(s): %s", strategy.num_replicas_in_sync,
                ", ".join(strategy.extended.worker_devices))
    return strategy


def training_strategy(args):
    """The strategy of ``--distribute``/``--devices`` (``None`` for none), after checking
    that both global batch sizes split evenly over its replicas.

    Raises:
        UsageError: a bad flag combination or a batch size not divisible by the replicas.
    """
    strategy = make_strategy(args.distribute, args.devices)
    check_global_batch(strategy, batch_size=args.batch_size, fine_tune_batch_size=args.fine_tune_batch_size)
    return strategy


class KerasDataParallel:
    """``--distribute mirrored`` on the JAX (or PyTorch) backend: Keras' own distribution API,
    ``keras.distribution.DataParallel`` over the given devices (default: every local
    accelerator, else the CPU), in the place of a ``tf.distribute`` strategy: ``scope()`` for
    building, compiling and fitting, ``num_replicas_in_sync`` for the global batch checks.

    Raises:
        UsageError: a device that does not exist (the visible ones are listed).
    """

    def __init__(self, devices=None):
        visible = keras.distribution.list_devices()
        if devices:
            wanted = [name.strip("/").lower().replace("device:", "") for name in devices]
            unknown = [name for name, canonical in zip(devices, wanted) if canonical not in visible]
            if unknown:
                raise UsageError(f"--devices {' '.join(unknown)}: no such device; visible: {' '.join(visible)}")
            visible = wanted
        self.distribution = keras.distribution.DataParallel(devices=visible)
        self.num_replicas_in_sync = len(visible)
        logger.info("keras.distribution.DataParallel over %d device(s): %s", len(visible), ", ".join(visible))

    def scope(self):
        return self.distribution.scope()


def _canonical(name):
    """``"gpu:1"``, ``"/GPU:1"`` or ``"/device:GPU:1"`` -> ``"/device:GPU:1"``; ``UsageError`` if unparsable."""
    import tensorflow as tf

    try:
        spec = tf.DeviceSpec.from_string(name if name.startswith("/") else f"/{name}")
    except ValueError as error:  # from TensorFlow's parser
        raise UsageError(f"--devices {name}: not a device name like /gpu:0 ({error})") from None
    return f"/device:{(spec.device_type or '').upper()}:{spec.device_index or 0}"


def check_global_batch(strategy, **batch_sizes):
    """Raises ``UsageError`` naming a global batch flag not divisible by the replicas.

    ``batch_sizes`` maps flag names (``batch_size=32``) to their values.
    """
    replicas = strategy.num_replicas_in_sync if strategy else 1
    for flag, value in batch_sizes.items():
        if value % replicas:
            raise UsageError(f"--{flag.replace('_', '-')} {value} is the global batch and must be divisible by "
                             f"the {replicas} replicas (e.g. {value - value % replicas or replicas}).")


def scope(strategy):
    """``strategy.scope()``, or a no-op context without a strategy."""
    return strategy.scope() if strategy else contextlib.nullcontext()


class LeadingBatches(keras.utils.PyDataset):
    """The first ``count`` batches of a ``PyDataset`` (which may reshuffle every epoch)."""

    def __init__(self, data, count):
        super().__init__(workers=data.workers, use_multiprocessing=False)
        self.data, self.count = data, count

    def __len__(self):
        return self.count

    def __getitem__(self, index):
        return self.data[index]

    def on_epoch_end(self):
        self.data.on_epoch_end()


def replica_safe(data, replicas, what):
    """``data`` without a last batch too small to give every replica an example.

    A last, partial batch smaller than the number of replicas would leave a replica
    without examples (TensorFlow 2.21's oneDNN convolution then fails on the empty
    batch). For a ``PyDataset`` such a batch is left out of each epoch (a reshuffling
    dataset rotates it); other data is returned as it is (the tf.data path drops the
    remainder itself).

    Raises:
        UsageError: the data is smaller than one global batch.
    """
    if replicas <= 1 or not isinstance(data, keras.utils.PyDataset):
        return data
    batches = len(data)
    last = len(keras.tree.flatten(data[batches - 1])[0])
    if last >= replicas:
        return data
    if batches == 1:
        raise UsageError(f"the {what} data holds {last} examples, fewer than the {replicas} replicas; "
                         "add data or use fewer devices")
    return LeadingBatches(data, batches - 1)
