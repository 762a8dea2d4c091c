"""Training across machines: ``MultiWorkerMirroredStrategy`` with a custom training loop.

Keras 3's ``model.fit`` fails under ``MultiWorkerMirroredStrategy`` (its symbolic build
reduces a ``PerReplica`` batch: keras-team/keras#20585, tensorflow/tensorflow#72388,
reproduced here with TensorFlow 2.21 / Keras 3.15), so ``--distribute multi-worker``
trains with the loop of the TensorFlow multi-worker guide: ``strategy.run`` of a step
with ``tf.GradientTape``, the model's Keras optimizer and ``tf.nn.compute_average_loss``
over the global batch. It keeps what ``fit`` gives: the same ``<phase>_best.keras``
checkpoint choice, ``<phase>_log.csv`` columns, TensorBoard scalars, a progress bar, a
NaN stop and resume after an interruption (``tf.train.CheckpointManager`` in
``backup/<phase>``, restored when every worker is started again with the same command).

Only the chief (``task.type == "chief"``, or worker 0 when the cluster has no chief)
writes into ``--output-dir``; the other workers write the same files into a folder of
their own in the system's temporary directory (``worker_dir``), removed when training
ends, as the guide does (saving may run collective ops, so every worker saves). Input comes from ``strategy.distribute_datasets_from_function``: each
worker decodes only its shard of the files.
"""

import csv
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import keras
import tensorflow as tf

logger = logging.getLogger(__name__)

TF_CONFIG_EXAMPLE = ('{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
                     '"task": {"type": "worker", "index": 0}}')


def read_tf_config(raw=None):
    """Parses and checks ``TF_CONFIG`` (the environment variable when ``raw`` is None).

    Returns:
        The parsed dict: ``cluster`` (``{"worker": ["host:port", ...], "chief": [...]}``)
        and ``task`` (``{"type": ..., "index": ...}``).

    Raises:
        ValueError: missing, not JSON, or not a cluster this process belongs to; the
            message shows a valid example.
    """
    raw = os.environ.get("TF_CONFIG", "") if raw is None else raw
    hint = f" Example for the first of two workers: TF_CONFIG='{TF_CONFIG_EXAMPLE}' (index 1 on the second)."
    if not raw.strip():
        raise ValueError("--distribute multi-worker needs the TF_CONFIG environment variable." + hint)
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as error:
        raise ValueError(f"TF_CONFIG is not valid JSON ({error}): {raw[:200]}." + hint) from None
    cluster = config.get("cluster") if isinstance(config, dict) else None
    if not isinstance(cluster, dict) or not (cluster.get("worker") or cluster.get("chief")):
        raise ValueError(f"TF_CONFIG needs a cluster with a 'worker' list of host:port addresses: {raw[:200]}." + hint)
    for kind, addresses in cluster.items():
        bad = [a for a in addresses if not (isinstance(a, str) and re.fullmatch(r"[^\s:]+:\d+", a))] \
            if isinstance(addresses, list) else [addresses]
        if bad:
            raise ValueError(f"TF_CONFIG cluster.{kind} must be a list of host:port addresses; bad: {bad}." + hint)
    task = config.get("task")
    if (not isinstance(task, dict) or task.get("type") not in cluster or not isinstance(task.get("index"), int)
            or not 0 <= task["index"] < len(cluster[task["type"]])):
        raise ValueError(f"TF_CONFIG task must name this process, a type among {sorted(cluster)} and an index "
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
    return tf.distribute.MultiWorkerMirroredStrategy()


def is_multi_worker(strategy):
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def is_chief_process(strategy):
    """True unless ``strategy`` is multi-worker and this process is not its chief."""
    return not is_multi_worker(strategy) or is_chief(read_tf_config())


@dataclasses.dataclass
class ShardedInput:
    """What a script gives ``run_phase`` instead of datasets.

    Attributes:
        dataset_fn: ``dataset_fn(training, input_context)``: this input pipeline's shard,
            batched per replica (``input_context.get_per_replica_batch_size``),
            repeating when ``training``.
        global_batch: the global batch size.
        train_steps, val_steps: global batches per epoch, the same on every worker.
    """

    dataset_fn: object
    global_batch: int
    train_steps: int
    val_steps: int

    @classmethod
    def whole_batches(cls, dataset_fn, global_batch, train_size, val_size, unit):
        """Steps of whole global batches for ``train_size``/``val_size`` examples (``unit``:
        ``"images"``, ``"sequences"``); ``ValueError`` naming a split smaller than one batch."""
        for name, size in (("train", train_size), ("val", val_size)):
            if size < global_batch:
                raise ValueError(f"{name}/ holds {size} {unit}, fewer than the global batch {global_batch}; "
                                 "multi-worker training uses whole global batches only")
        return cls(dataset_fn, global_batch, train_size // global_batch, val_size // global_batch)


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


def run_phase(model, phase, data, epochs, output_dir, strategy, monitor="val_loss", top_k=5, steps_per_epoch=None):
    """One training phase under ``MultiWorkerMirroredStrategy`` (see the module docstring).

    Args:
        model: compiled inside ``strategy.scope()`` (its optimizer is used).
        phase: file prefix, ``"phase1"``.
        data: a ``ShardedInput`` of ``(images, one_hot_labels)`` batches.
        epochs: total epochs of the phase.
        output_dir: this worker's ``worker_dir``.
        strategy: the ``MultiWorkerMirroredStrategy``.
        monitor: ``"val_loss"`` (lower is better) or ``"val_accuracy"``.
        top_k: ``top5_accuracy`` is top-``top_k`` (top-all with fewer classes).
        steps_per_epoch: at most this many global batches per epoch (default: all).

    Returns:
        The path of the best checkpoint.

    Raises:
        training.NaNLossError: a NaN or infinite loss (nothing of that epoch is saved).
    """
    from helpers.training import NaNLossError, phase_complete, read_history

    chief = is_chief(read_tf_config())
    output_dir = Path(output_dir)
    best_path, done_path = output_dir / f"{phase}_best.keras", output_dir / f"{phase}_done.json"
    if phase_complete(output_dir, phase):
        return best_path
    output_dir.mkdir(parents=True, exist_ok=True)
    epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
    checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer, epoch=epoch)
    # Two backups: a worker killed between two workers' saves of the same epoch is one
    # epoch behind the others; all resume from the newest epoch every worker has.
    backup = tf.train.CheckpointManager(checkpoint, str(output_dir / "backup" / phase), max_to_keep=2)
    saved = {int(path.rsplit("-", 1)[1]): path for path in backup.checkpoints}
    resume = _agreed_epoch(strategy, max(saved, default=0))
    if resume:
        if resume not in saved:
            raise ValueError(f"{phase}: the workers' backups are too far apart to resume together (this worker has "
                             f"epochs {sorted(saved)}, the cluster needs {resume}); delete every worker's backup/"
                             f"{phase} folder to restart the phase.")
        checkpoint.restore(saved[resume])
        logger.info("%s: resuming after %d completed epochs (%s)", phase, resume, saved[resume])
    classes = model.output_shape[-1]
    k = top_k if classes > top_k else classes

    global_batch, train_steps, val_steps = data.global_batch, data.train_steps, data.val_steps
    train_steps = min(train_steps, steps_per_epoch or train_steps)
    train_data = iter(strategy.distribute_datasets_from_function(lambda context: data.dataset_fn(True, context)))
    val_data = strategy.distribute_datasets_from_function(lambda context: data.dataset_fn(False, context))

    def sums(images, labels, training):
        probabilities = model(images, training=training)
        losses = keras.losses.categorical_crossentropy(labels, probabilities)
        truth = tf.argmax(labels, axis=-1)
        correct = tf.cast(tf.equal(tf.argmax(probabilities, axis=-1), truth), tf.float32)
        top = tf.cast(tf.math.in_top_k(truth, tf.cast(probabilities, tf.float32), k), tf.float32)
        return losses, tf.stack([tf.reduce_sum(losses), tf.reduce_sum(correct), tf.reduce_sum(top),
                                 tf.cast(tf.shape(losses)[0], tf.float32)])

    @tf.function
    def train_step(iterator):
        def step(images, labels):
            with tf.GradientTape() as tape:
                losses, totals = sums(images, labels, True)
                # scale_loss: a LossScaleOptimizer's loss scaling (float16); a no-op otherwise
                loss = model.optimizer.scale_loss(tf.nn.compute_average_loss(losses, global_batch_size=global_batch))
            variables = model.trainable_variables
            model.optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
            return totals
        return strategy.reduce("SUM", strategy.run(step, args=next(iterator)), axis=None)

    @tf.function
    def val_step(batch):
        return strategy.reduce("SUM", strategy.run(lambda x, y: sums(x, y, False)[1], args=batch), axis=None)

    history = read_history(output_dir / f"{phase}_log.csv")
    past = history.get(monitor, [])[:int(epoch.numpy())]
    best = (min if "loss" in monitor else max)(past) if past else None
    writer = tf.summary.create_file_writer(str(output_dir / "logs" / phase))
    first = int(epoch.numpy())
    for current in range(first, epochs):
        logger.info("%s: epoch %d/%d", phase, current + 1, epochs)
        progress = keras.utils.Progbar(train_steps, verbose=1 if chief else 0,
                                       stateful_metrics=["loss", "accuracy"])
        totals = tf.zeros(4)
        for step_index in range(train_steps):
            step_totals = train_step(train_data)
            totals += step_totals
            loss = float(step_totals[0] / step_totals[3])
            if not math.isfinite(loss):
                raise NaNLossError(f"{phase}: the loss became {loss} in epoch {current + 1}, batch {step_index + 1}. "
                                   "Lower the learning rate; the last good backup and checkpoint are kept.")
            progress.update(step_index + 1, [("loss", float(totals[0] / totals[3])),
                                             ("accuracy", float(totals[1] / totals[3]))])
        val_totals = tf.zeros(4)
        for batch, _ in zip(val_data, range(val_steps)):
            val_totals += val_step(batch)
        logs = {"accuracy": totals[1] / totals[3], "loss": totals[0] / totals[3],
                "top5_accuracy": totals[2] / totals[3], "val_accuracy": val_totals[1] / val_totals[3],
                "val_loss": val_totals[0] / val_totals[3], "val_top5_accuracy": val_totals[2] / val_totals[3]}
        logs = {key: float(value) for key, value in logs.items()}
        logger.info("%s: epoch %d: %s", phase, current + 1,
                    " - ".join(f"{key}: {value:.4f}" for key, value in logs.items()))
        value = logs[monitor]
        if best is None or (value < best if "loss" in monitor else value > best):
            best = value
            model.save(best_path)  # every worker saves (saving may need collectives)
        with writer.as_default(step=current):
            for key, value in logs.items():
                tf.summary.scalar(key, value)
        _append_csv(output_dir / f"{phase}_log.csv", current, logs)
        epoch.assign(current + 1)
        backup.save(checkpoint_number=current + 1)
    logger.info("%s: weights fingerprint %.12g (equal on every worker)", phase,
                sum(float(tf.reduce_sum(tf.abs(tf.cast(w, tf.float64)))) for w in model.weights))
    shutil.rmtree(output_dir / "backup" / phase, ignore_errors=True)
    if (output_dir / "backup").is_dir() and not any((output_dir / "backup").iterdir()):
        (output_dir / "backup").rmdir()
    done_path.write_text(json.dumps({"epochs": epochs, "epochs_run": epochs - first, "first_epoch": first}))
    return best_path


def _agreed_epoch(strategy, local):
    """The smallest ``local`` value over all workers (a collective: every worker calls it)."""
    values = strategy.gather(strategy.run(lambda: tf.constant([local], tf.int64)), axis=0)
    return int(tf.reduce_min(values))


def _append_csv(path, epoch, logs):
    """Appends one row in ``keras.callbacks.CSVLogger``'s format (epoch, then sorted keys)."""
    new = not path.is_file()
    with path.open("a", newline="") as handle:
        writer = csv.writer(handle)
        if new:
            writer.writerow(["epoch", *sorted(logs)])
        writer.writerow([epoch, *(logs[key] for key in sorted(logs))])
