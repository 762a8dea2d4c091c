"""Data-parallel training: ``tf.distribute`` on TensorFlow, ``keras.distribution.DataParallel``
on JAX (one process, or several with ``ProcessDataParallel``: ``--distribute multi-worker``).

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
import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

import keras
import numpy as np

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
            return ProcessDataParallel()
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


def training_strategy(distribute, devices, batch_size, fine_tune_batch_size):
    """The strategy of ``--distribute``/``--devices`` (``None`` for none), after checking
    that both global batch sizes (``--batch-size``, ``--fine-tune-batch-size``) split evenly
    over its replicas.

    Raises:
        UsageError: a bad flag combination or a batch size not divisible by the replicas.
    """
    strategy = make_strategy(distribute, devices)
    check_global_batch(strategy, batch_size=batch_size, fine_tune_batch_size=fine_tune_batch_size)
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


# The environment variables keras.distribution.initialize() reads, and what they hold.
PROCESS_VARIABLES = ("KERAS_DISTRIBUTION_JOB_ADDRESSES", "KERAS_DISTRIBUTION_NUM_PROCESSES",
                     "KERAS_DISTRIBUTION_PROCESS_ID")
PROCESS_EXAMPLE = ("KERAS_DISTRIBUTION_JOB_ADDRESSES=10.0.0.1:1234 KERAS_DISTRIBUTION_NUM_PROCESSES=2 "
                   "KERAS_DISTRIBUTION_PROCESS_ID=0 (1 on the second machine)")
HEARTBEAT_SECONDS = 60  # a process silent this long ends the run in every process
SHUTDOWN_SECONDS = 24 * 3600  # the others wait at exit while the chief evaluates


def read_process_variables(environ=None):
    """``(coordinator address, number of processes, this process's index)`` from the variables
    ``keras.distribution.initialize()`` reads (``PROCESS_VARIABLES``; of a comma-separated list of
    addresses the first, process 0's, is the coordinator, as Keras takes it).

    Raises:
        UsageError: a variable missing or malformed; the message shows a valid set.
    """
    environ = os.environ if environ is None else environ
    hint = f" Example, on the first of two machines: {PROCESS_EXAMPLE}."
    missing = [name for name in PROCESS_VARIABLES if not environ.get(name, "").strip()]
    if missing:
        raise UsageError(f"--distribute multi-worker on {backend.name()} needs {', '.join(missing)}." + hint)
    addresses = [a.strip() for a in environ[PROCESS_VARIABLES[0]].split(",") if a.strip()]
    try:
        count, index = int(environ[PROCESS_VARIABLES[1]]), int(environ[PROCESS_VARIABLES[2]])
    except ValueError:
        raise UsageError(f"{PROCESS_VARIABLES[1]} and {PROCESS_VARIABLES[2]} must be integers. Received: "
                         f"{environ[PROCESS_VARIABLES[1]]!r}, {environ[PROCESS_VARIABLES[2]]!r}." + hint) from None
    if count < 1 or not 0 <= index < count or (len(addresses) > 1 and len(addresses) != count):
        raise UsageError(f"process {index} of {count} with {len(addresses)} address(es) in "
                         f"{PROCESS_VARIABLES[0]} is not a cluster." + hint)
    return addresses[0], count, index


class ProcessDataParallel(KerasDataParallel):
    """``--distribute multi-worker`` on JAX: one process per machine (or per GPU), started with
    the variables ``keras.distribution.initialize()`` reads (``PROCESS_VARIABLES``), and
    ``keras.distribution.DataParallel`` over every process's devices. Each process feeds its
    slice of every global batch (``ProcessSlices``: it reads those samples only);
    ``auto_shard_dataset`` is off since the slices are made here.

    ``jax.distributed`` starts as ``keras.distribution.initialize()`` starts it, with two
    timeouts that call does not set: a process silent for ``HEARTBEAT_SECONDS`` ends the run in
    every process (no process waits for a dead peer), and the others wait up to
    ``SHUTDOWN_SECONDS`` at exit while the chief (process 0) evaluates. JAX's CPU collectives
    are gloo's (the default from jax 0.5.1), so processes on one machine's loopback train too.

    Raises:
        UsageError: the variables are missing or malformed (``read_process_variables``).
    """

    def __init__(self):
        import jax

        coordinator, count, index = read_process_variables()
        if not jax.distributed.is_initialized():
            jax.distributed.initialize(coordinator_address=coordinator, num_processes=count, process_id=index,
                                       heartbeat_timeout_seconds=HEARTBEAT_SECONDS,
                                       shutdown_timeout_seconds=SHUTDOWN_SECONDS)
        devices = keras.distribution.list_devices()
        self.distribution = keras.distribution.DataParallel(devices=devices, auto_shard_dataset=False)
        self.num_replicas_in_sync = len(devices)
        self.process_index, self.num_processes = jax.process_index(), jax.process_count()
        logger.info("multi-worker on JAX: process %d of %d (coordinator %s), keras.distribution.DataParallel over "
                    "%d device(s)", index, count, coordinator, len(devices))


def process_slices(strategy, datasets, global_batch):
    """``datasets`` (``{split name: global batches}``) as this process's ``ProcessSlices`` under
    ``--distribute multi-worker`` on JAX, else as they are: a tuple in their order."""
    if not isinstance(strategy, ProcessDataParallel):
        return tuple(datasets.values())
    return tuple(ProcessSlices(data, strategy, global_batch, name) for name, data in datasets.items())


def process_count(strategy):
    """The processes training together: ``num_processes`` of a ``ProcessDataParallel``, else 1
    (TensorFlow's multi-worker strategy keeps its own count, ``helpers.multiworker``)."""
    return getattr(strategy, "num_processes", 1)


def is_chief(strategy):
    """True for the process that writes the run: every process but a multi-worker one whose
    index is not 0 (``helpers.multiworker.is_chief_process`` on TensorFlow)."""
    if isinstance(strategy, ProcessDataParallel):
        return strategy.process_index == 0
    return multiworker.is_chief_process(strategy)


def output_folder(strategy, output_dir):
    """Where this process writes: ``output_dir`` on the chief; on another multi-worker process a
    folder of its own in the temporary directory, stable across restarts, removed by ``cleanup``."""
    if isinstance(strategy, ProcessDataParallel):
        return Path(output_dir) if strategy.process_index == 0 else process_folder(output_dir, strategy.process_index)
    return multiworker.worker_dir(output_dir) if multiworker.is_multi_worker(strategy) else Path(output_dir)


def process_folder(output_dir, index):
    """Process ``index``'s folder (not the chief's) for a run in ``output_dir``: in the temporary
    directory, named by both, so that the same command finds it again after a restart."""
    key = hashlib.sha1(str(Path(output_dir).resolve()).encode()).hexdigest()[:10]
    return Path(tempfile.gettempdir()) / f"cnn_rnn_process_{index}_{key}"


def cleanup(strategy, output_dir):
    """Removes a non-chief process's ``output_folder`` once its training is done."""
    if not is_chief(strategy):
        shutil.rmtree(output_folder(strategy, output_dir), ignore_errors=True)


def smallest_everywhere(strategy, value):
    """The smallest of every process's integer ``value`` (``multihost_utils.process_allgather``,
    every process in step); ``value`` itself with one process."""
    if process_count(strategy) == 1:
        return int(value)
    from jax.experimental import multihost_utils

    return int(np.min(multihost_utils.process_allgather(np.int32(value))))


def everywhere(strategy, flag):
    """True when ``flag`` holds in every process of a multi-process run (``smallest_everywhere``),
    else ``flag`` itself: whether a phase is complete or a cache holds, asked so that every process
    then takes the same path (one that trains a phase or computes features while another skips
    would wait in a collective)."""
    return bool(smallest_everywhere(strategy, bool(flag)))


def agreed_epoch(strategy, saved, phase, folder):
    """The completed epochs every process of a multi-process run resumes from: the newest backup
    each holds, the oldest of those (``smallest_everywhere``, every process in
    step); ``max(saved, default=0)`` alone.

    Each process backs up into its own folder (the chief into the run), and a kill can fall
    between two processes' saves: they then restore the same epoch (``EpochBackup`` keeps two),
    so every process loads the same weights, as it must (assigning them is a collective).

    Raises:
        UsageError: this process lacks that epoch's backup; every process says so and stops.
    """
    newest = max(saved, default=0)
    if process_count(strategy) == 1:
        return newest
    first = smallest_everywhere(strategy, newest)
    if first and first not in saved:
        raise UsageError(f"{phase}: the processes' backups are too far apart to resume together (this process has "
                         f"epochs {sorted(saved)}, the run needs {first}); delete every process's {folder} folder to "
                         "restart the phase.")
    return first


def local_predictor(encoder):
    """``predict(images) -> numpy``: ``encoder``'s inference (``training=False``) on this process's
    first device alone, from a copy of its weights. A model built under ``ProcessDataParallel``
    holds global arrays, and Keras's ``predict`` would take each process's batch for its part of
    one global batch; this one computes what the process asks, no other process involved.

    Args:
        encoder: a built ``keras.Model``.

    Returns:
        A function from a numpy batch (``encoder``'s input, batch axis first) to its numpy output.
    """
    import jax

    device = jax.local_devices()[0]
    trainable = jax.device_put([np.asarray(v.value) for v in encoder.trainable_variables], device)
    other = jax.device_put([np.asarray(v.value) for v in encoder.non_trainable_variables], device)
    step = jax.jit(lambda t, n, x: encoder.stateless_call(t, n, x, training=False)[0])
    return lambda batch: np.asarray(step(trainable, other, jax.device_put(batch, device)))


def shared_rows(strategy, count, shape, dtype, compute, chunk=256):
    """Rows ``[0, count)`` computed in shares, process ``p`` the ``p``-th contiguous share (``ceil(count
    / n)`` rows), and gathered on every process (``multihost_utils.process_allgather``, ``chunk``
    rows of each share per round, every process in step): each process reads only its share's
    inputs (its images), and every process ends with every row (the features it trains on).

    Args:
        strategy: the ``ProcessDataParallel``.
        count: the rows.
        shape: one row's shape (without the row axis).
        dtype: the rows' numpy dtype.
        compute: ``compute(first, stop)`` -> rows ``[first, stop)`` as ``(stop - first, *shape)``.
        chunk: rows of each share gathered per round (memory: ``n * chunk`` rows at a time).

    Returns:
        ``(count, *shape)`` array of ``dtype``, the same on every process.
    """
    from jax.experimental import multihost_utils

    processes, share = strategy.num_processes, -(-count // strategy.num_processes)
    first, stop = min(strategy.process_index * share, count), min((strategy.process_index + 1) * share, count)
    logger.info("process %d of %d computes rows [%d, %d) of %d; the other processes' rows are gathered",
                strategy.process_index, processes, first, stop, count)
    result, rows = np.empty((count, *shape), dtype), max(1, min(chunk, share))
    for offset in range(0, share, rows):  # the same rounds in every process
        block = np.zeros((rows, *shape), dtype)
        start, end = first + offset, min(first + offset + rows, stop)
        if start < end:
            block[:end - start] = compute(start, end)
        gathered = np.asarray(multihost_utils.process_allgather(block))  # (processes, rows, *shape)
        for process in range(processes):
            start = process * share + offset
            end = min(start + rows, (process + 1) * share, count)
            if start < end:
                result[start:end] = gathered[process, :end - start]
    return result


class ProcessSlices(keras.utils.PyDataset):
    """This process's slice of every whole global batch of ``data``: of ``n`` processes, process
    ``p`` feeds rows ``[p * b, (p + 1) * b)`` of each global batch (``b`` = global batch / ``n``)
    and reads only those samples, so that the processes together train on exactly the global
    batches one process would, no sample twice in an epoch. The batches are the same in every
    process: drawn here for ``data`` of rows (with ``data.shuffle``, epoch ``e``'s order is
    ``numpy.random.default_rng([seed, e]).permutation``; a last global batch too small to split
    evenly is left out), or planned by ``data`` itself (bucketed captions: each epoch's batches
    of ``data.plan_batch_size`` rows are kept, the smaller ones left out).

    Args:
        data: either rows, with ``row_count`` (its samples), ``shuffle``, ``seed`` and
            ``load_rows(rows)`` (the batch of those samples), as
            ``cnn_rnn_classifier.ImageReadingIterator`` and ``helpers.sequences.FrameSequences``;
            or planned batches, with ``plan_epoch(epoch)`` (that epoch's batches as arrays of rows,
            drawn from the epoch and a seed alone, the same number of whole batches every epoch),
            ``plan_batch_size`` (a whole batch's rows) and ``load_part(rows, part)`` (the part
            ``part``, a ``slice`` of ``rows``, of that batch, padded as the whole batch would be),
            as ``helpers.caption_batches.CaptionBatches``.
        strategy: the ``ProcessDataParallel``.
        global_batch: the global batch size (rows data); a multiple of the processes.
        what: the split's name, for errors.

    Raises:
        UsageError: ``data`` holds fewer samples than one global batch, or its planned batches do
            not split evenly over the processes.
    """

    def __init__(self, data, strategy, global_batch, what):
        super().__init__(workers=getattr(data, "workers", 1), use_multiprocessing=False)
        self.planned = hasattr(data, "plan_epoch")
        if self.planned:
            global_batch = data.plan_batch_size
            if global_batch % strategy.num_processes:
                raise UsageError(f"the {what} batches hold {global_batch} images each, which do not split evenly "
                                 f"over {strategy.num_processes} processes; choose a batch size that does")
        self.data, self.global_batch, self.epoch = data, global_batch, 0
        self.size = global_batch // strategy.num_processes
        self.first = strategy.process_index * self.size
        self.plan = self._plan()
        if not self.plan:
            rows = data.row_count if not self.planned else sum(map(len, data.plan_epoch(0)))
            raise UsageError(f"the {what} data holds {rows} samples, fewer than the global batch "
                             f"{global_batch}; multi-worker training uses whole global batches only")

    def _plan(self):
        """This epoch's whole global batches, as arrays of rows of ``data``."""
        if self.planned:
            return [rows for rows in self.data.plan_epoch(self.epoch) if len(rows) == self.global_batch]
        if self.data.shuffle:
            order = np.random.default_rng([self.data.seed or 0, self.epoch]).permutation(self.data.row_count)
        else:
            order = np.arange(self.data.row_count)
        batch = self.global_batch
        return [order[i * batch:(i + 1) * batch] for i in range(self.data.row_count // batch)]

    def __len__(self):
        return len(self.plan)

    def __getitem__(self, index):
        part = slice(self.first, self.first + self.size)
        if self.planned:
            return self.data.load_part(self.plan[index], part)
        return self.data.load_rows(self.plan[index][part])

    def on_epoch_end(self):
        self.data.on_epoch_end()  # its own epoch count (FrameSequences' augmentation)

    def start_at(self, epoch):
        """Epoch ``epoch``'s batches from now on: ``EpochOrder`` calls it as each epoch begins, so that
        a phase resumed after ``epoch`` completed epochs reads the batches the uninterrupted one read.
        (Counting ``on_epoch_end`` calls would not do: Keras's JAX ``fit`` calls it once more before
        the first epoch, after reading a batch to build the model, and its input threads may read
        ahead.)"""
        self.epoch = epoch
        self.plan = self._plan()


class EpochOrder(keras.callbacks.Callback):
    """Sets a ``ProcessSlices``'s epoch as each epoch begins (``ProcessSlices.start_at``), before
    ``fit`` reads any of its batches (its input starts after ``on_epoch_begin``)."""

    def __init__(self, data):
        super().__init__()
        self.data = data

    def on_epoch_begin(self, epoch, logs=None):
        self.data.start_at(epoch)


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
    if replicas <= 1 or not isinstance(data, keras.utils.PyDataset) or isinstance(data, ProcessSlices):
        return data  # ProcessSlices: whole global batches already
    batches = len(data)
    last = len(keras.tree.flatten(data[batches - 1])[0])
    if last >= replicas:
        return data
    if batches == 1:
        raise UsageError(f"the {what} data holds {last} examples, fewer than the {replicas} replicas; "
                         "add data or use fewer devices")
    return LeadingBatches(data, batches - 1)
