"""Training across machines: ``MultiWorkerMirroredStrategy`` with a custom training loop.

Keras 3's ``model.fit`` fails under ``MultiWorkerMirroredStrategy``: its step function
reduces the per-replica metric scalars with ``strategy.reduce("MEAN", v, axis=0)``
(keras-team/keras#20585, reproduced here with TensorFlow 2.21 / Keras 3.15). ``fit``
below is ``fit``'s own loop with that one reduction done right: each step runs the
compiled model's ``train_step`` (its loss, optimizer and metrics) in ``strategy.run``
and averages the replicas' results, and the same Keras callbacks as the
single-machine path (checkpoint, CSV log, TensorBoard, NaN stop, progress bar) are
driven through ``keras.callbacks.CallbackList``. Only resume does not go through a
callback: ``BackupAndRestore`` restores each worker from its own last backup, but a
worker killed between two workers' saves is an epoch behind the others, so the
workers must first agree on an epoch they all have (``_agreed_epoch``, a
collective); ``tf.train.CheckpointManager`` keeps the last two.

Only the chief (``task.type == "chief"``, or worker 0 when the cluster has no chief)
writes into ``--output-dir``; the other workers write the same files into a folder of
their own in the system's temporary directory (``worker_dir``), removed when training
ends, as the TensorFlow guide does (saving may run collective ops, so every worker
saves). Input comes from ``strategy.distribute_datasets_from_function``: each worker
decodes only its shard of the files.
"""

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import keras

from helpers.errors import UsageError

logger = logging.getLogger(__name__)

TF_CONFIG_EXAMPLE = ('{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
                     '"task": {"type": "worker", "index": 0}}')


def read_tf_config(raw=None):
    """Parses and checks ``TF_CONFIG`` (the environment variable when ``raw`` is None).

    Returns:
        The parsed dict: ``cluster`` (``{"worker": ["host:port", ...], "chief": [...]}``)
        and ``task`` (``{"type": ..., "index": ...}``).

    Raises:
        UsageError: missing, not JSON, or not a cluster this process belongs to; the
            message shows a valid example.
    """
    raw = os.environ.get("TF_CONFIG", "") if raw is None else raw
    hint = f" Example for the first of two workers: TF_CONFIG='{TF_CONFIG_EXAMPLE}' (index 1 on the second)."
    if not raw.strip():
        raise UsageError("--distribute multi-worker needs the TF_CONFIG environment variable." + hint)
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as error:
        raise UsageError(f"TF_CONFIG is not valid JSON ({error}): {raw[:200]}." + hint) from None
    cluster = config.get("cluster") if isinstance(config, dict) else None
    if not isinstance(cluster, dict) or not (cluster.get("worker") or cluster.get("chief")):
        raise UsageError(f"TF_CONFIG needs a cluster with a 'worker' list of host:port addresses: {raw[:200]}." + hint)
    for kind, addresses in cluster.items():
        bad = [a for a in addresses if not (isinstance(a, str) and re.fullmatch(r"[^\s:]+:\d+", a))] \
            if isinstance(addresses, list) else [addresses]
        if bad:
            raise UsageError(f"TF_CONFIG cluster.{kind} must be a list of host:port addresses; bad: {bad}." + hint)
    task = config.get("task")
    if (not isinstance(task, dict) or task.get("type") not in cluster or not isinstance(task.get("index"), int)
            or not 0 <= task["index"] < len(cluster[task["type"]])):
        raise UsageError(f"TF_CONFIG task must name this process, a type among {sorted(cluster)} and an index "
                         f"into its list. Received: {task}." + hint)
    return config


def is_chief(config):
    """True for the process that writes the outputs."""
    task = config["task"]
    return task["type"] == "chief" or (task["type"] == "worker" and task["index"] == 0
                                       and "chief" not in config["cluster"])


def make_strategy():
    """Checks ``TF_CONFIG`` and returns ``MultiWorkerMirroredStrategy`` (blocks until every
    worker has started)."""
    config = read_tf_config()
    logger.info("MultiWorkerMirroredStrategy: %s %d of cluster %s", config["task"]["type"], config["task"]["index"],
                json.dumps(config["cluster"]))
    import tensorflow as tf

    return tf.distribute.MultiWorkerMirroredStrategy()


def is_multi_worker(strategy):
    """True for a ``MultiWorkerMirroredStrategy`` (never imports TensorFlow: without it there is none)."""
    tf = sys.modules.get("tensorflow")
    return tf is not None and isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def is_chief_process(strategy):
    """True unless ``strategy`` is multi-worker and this process is not its chief."""
    return not is_multi_worker(strategy) or is_chief(read_tf_config())


@dataclasses.dataclass
class ShardedInput:
    """One split's input for ``fit``, given instead of a dataset.

    Attributes:
        dataset_fn: ``dataset_fn(input_context)``: this input pipeline's shard, batched
            per replica (``input_context.get_per_replica_batch_size``), repeating for
            training.
        name: the split's folder name, for errors.
        size: examples in the split.
        global_batch: the global batch size.
        unit: what an example is (``"images"``, ``"sequences"``), for errors.
    """

    dataset_fn: object
    name: str
    size: int
    global_batch: int
    unit: str

    @property
    def steps(self):
        """Whole global batches per epoch, the same on every worker.

        Raises:
            UsageError: the split is smaller than one global batch.
        """
        if self.size < self.global_batch:
            raise UsageError(f"{self.name}/ holds {self.size} {self.unit}, fewer than the global batch "
                             f"{self.global_batch}; multi-worker training uses whole global batches only")
        return self.size // self.global_batch

    @classmethod
    def train_and_val(cls, dataset_fn, global_batch, train_size, val_size, unit):
        """``(train, val)`` inputs of ``train_size``/``val_size`` examples, where
        ``dataset_fn(training, input_context)`` makes either."""
        return (cls(lambda context: dataset_fn(True, context), "train", train_size, global_batch, unit),
                cls(lambda context: dataset_fn(False, context), "val", val_size, global_batch, unit))


def worker_dir(output_dir):
    """Where this worker writes: ``output_dir`` on the chief; on another worker a folder in
    the system's temporary directory, stable across restarts (so an interrupted run
    resumes), removed by ``cleanup`` when training ends."""
    config = read_tf_config()
    if is_chief(config):
        return Path(output_dir)
    key = hashlib.sha1(str(Path(output_dir).resolve()).encode()).hexdigest()[:10]
    task = config["task"]
    return Path(tempfile.gettempdir()) / f"cnn_rnn_{task['type']}_{task['index']}_{key}"


def cleanup(output_dir):
    """Removes a non-chief worker's ``worker_dir``."""
    if not is_chief(read_tf_config()):
        shutil.rmtree(worker_dir(output_dir), ignore_errors=True)


def fit(model, train, val, epochs, callbacks, strategy, backup_dir, steps_per_epoch=None, verbose=1, name="fit"):
    """``model.fit`` for ``MultiWorkerMirroredStrategy`` (see the module docstring).

    Args:
        model: compiled inside ``strategy.scope()``.
        train, val: ``ShardedInput``s.
        epochs: total epochs; a resumed run starts after its last backed-up epoch.
        callbacks: Keras callbacks, driven as ``fit`` drives them (``BackupAndRestore``
            excluded: resume is this function's own).
        strategy: the ``MultiWorkerMirroredStrategy``.
        backup_dir: this worker's resume state, deleted when the epochs are done.
        steps_per_epoch: at most this many global batches per epoch (default: all).
        verbose: progress bar (1), a line per epoch (2) or nothing (0).
        name: the log lines' prefix (the phase).

    Returns:
        The epoch this call started from (0, or the resumed epoch).

    Raises:
        UsageError: a split smaller than one global batch, or the workers' backups are
            too far apart to resume together.
        Whatever a callback raises (``helpers.errors.NaNLossError``).
    """
    import tensorflow as tf

    train_steps, val_steps = min(train.steps, steps_per_epoch or train.steps), val.steps
    epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
    checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer, epoch=epoch)
    backup = tf.train.CheckpointManager(checkpoint, str(backup_dir), max_to_keep=2)
    saved = {int(path.rsplit("-", 1)[1]): path for path in backup.checkpoints}
    first = _agreed_epoch(strategy, max(saved, default=0))
    if first:
        if first not in saved:
            raise UsageError(f"{name}: the workers' backups are too far apart to resume together (this worker has epochs "
                             f"{sorted(saved)}, the cluster needs {first}); delete every worker's {backup_dir} "
                             "folder to restart the phase.")
        checkpoint.restore(saved[first])
        logger.info("%s: resuming after %d completed epochs (%s)", name, first, saved[first])

    def distributed(step):
        @tf.function
        def run(iterator):
            outputs = strategy.run(step, args=(next(iterator),))
            return {name: strategy.reduce("MEAN", value, axis=None) for name, value in outputs.items()}
        return run

    train_step, test_step = distributed(model.train_step), distributed(model.test_step)
    train_data = iter(strategy.distribute_datasets_from_function(train.dataset_fn))
    val_data = strategy.distribute_datasets_from_function(val.dataset_fn)
    callbacks = keras.callbacks.CallbackList(callbacks, add_progbar=verbose != 0, verbose=verbose, epochs=epochs,
                                             steps=train_steps, model=model)
    model.stop_training = False
    callbacks.on_train_begin()
    logs = {}
    for current in range(first, epochs):
        model.reset_metrics()
        callbacks.on_epoch_begin(current)
        for step in range(train_steps):
            callbacks.on_train_batch_begin(step)
            logs = train_step(train_data)
            callbacks.on_train_batch_end(step, logs)
        logs = {name: float(value) for name, value in logs.items()}
        model.reset_metrics()
        val_iterator = iter(val_data)
        for _ in range(val_steps):
            val_logs = test_step(val_iterator)
        logs.update({f"val_{name}": float(value) for name, value in val_logs.items()})
        callbacks.on_epoch_end(current, logs)
        epoch.assign(current + 1)
        backup.save(checkpoint_number=current + 1)
        if model.stop_training:
            break
    callbacks.on_train_end(logs)
    logger.debug("%s: weights fingerprint %.12g (equal on every worker)", name,
                 sum(float(tf.reduce_sum(tf.abs(tf.cast(w, tf.float64)))) for w in model.weights))
    shutil.rmtree(backup_dir, ignore_errors=True)
    return first


def _agreed_epoch(strategy, local):
    """The smallest ``local`` value over all workers (a collective: every worker calls it)."""
    import tensorflow as tf

    values = strategy.gather(strategy.run(lambda: tf.constant([local], tf.int64)), axis=0)
    return int(tf.reduce_min(values))
