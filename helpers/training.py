"""Training phases: freeze/unfreeze, callbacks, resume, NaN handling.

Both scripts train in phases (backbone frozen, then fine-tuned). Each phase
writes into the output directory:

    <phase>_best.keras        best model by the phase's monitored metric
    <phase>_log.csv           one row per epoch (CSVLogger, appended on resume)
    logs/<phase>/             TensorBoard logs
    backup/<phase>/           BackupAndRestore state, deleted when the phase ends
    <phase>_done.json         written when the phase completes; a rerun skips it
"""

import csv
import dataclasses
import json
import logging
import math
import shutil
import sys
from pathlib import Path

import keras
import tensorflow as tf

from helpers import distribute, multiworker, reports

logger = logging.getLogger(__name__)


class NaNLossError(RuntimeError):
    """Training produced a NaN or infinite loss and was stopped."""


class StopOnNaN(keras.callbacks.Callback):
    """Raises ``NaNLossError`` at the first batch whose loss is NaN or infinite.

    Unlike ``keras.callbacks.TerminateOnNaN`` it raises before the epoch ends, so
    neither ``BackupAndRestore`` nor ``ModelCheckpoint`` ever saves the broken
    weights: the last good backup and best checkpoint stay.
    """

    def __init__(self, phase):
        super().__init__()
        self.phase = phase
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise NaNLossError(
                f"{self.phase}: the loss became {float(loss)} at epoch {self.epoch + 1}, "
                f"batch {batch + 1}. Training stopped; the last good checkpoint and backup are "
                "kept. Lower the learning rate and run the same command again to resume."
            )


def find_layer(model, name):
    """The layer called ``name`` anywhere in ``model``: nested models and wrappers included.

    Raises:
        ValueError: no such layer.
    """
    stack = [model]
    while stack:
        layer = stack.pop()
        if layer.name == name and layer is not model:
            return layer
        stack.extend(getattr(layer, "layers", []))
        if isinstance(layer, keras.layers.Wrapper):
            stack.append(layer.layer)
    raise ValueError(f"No layer named {name!r} in model {model.name!r}.")


def set_backbone_trainable(model, backbone_name, trainable, train_batchnorm=False, top_layers=None):
    """Freezes or unfreezes a backbone, keeping BatchNormalization in inference mode.

    Keras 3 runs a ``BatchNormalization`` layer whose ``trainable`` is False in
    inference mode (moving statistics used and not updated). Fine-tuning with small
    batches otherwise wrecks the ImageNet statistics, so by default they stay
    frozen while every other layer trains; see keras-io
    ``examples/vision/image_classification_efficientnet_fine_tuning.py``
    (``unfreeze_model``).

    Args:
        model: a model holding the backbone as a nested layer (at any depth).
        backbone_name: the nested backbone's name (``"xception"``, ``"vgg16"``).
        trainable: True to fine-tune the backbone, False to freeze all of it.
        train_batchnorm: when ``trainable``, also train the BatchNormalization
            layers (their gamma/beta and moving statistics).
        top_layers: when ``trainable``, unfreeze only the backbone's last
            ``top_layers`` layers (the LRCN seed fine-tunes VGG16's top 5); ``None``
            unfreezes all.

    Returns:
        The number of trainable weight tensors in the backbone.
    """
    backbone = find_layer(model, backbone_name)
    backbone.trainable = trainable
    if trainable:
        first_trainable = len(backbone.layers) - top_layers if top_layers is not None else 0
        for index, layer in enumerate(backbone.layers):
            if index < first_trainable or (
                isinstance(layer, keras.layers.BatchNormalization) and not train_batchnorm
            ):
                layer.trainable = False
    return len(backbone.trainable_weights)


@dataclasses.dataclass
class Phase:
    """One training phase.

    Attributes:
        name: file prefix, ``"phase1"``.
        title: plot title.
        epochs: 0 skips the phase.
        batch_size: passed to ``make_data``.
        optimizer: a function returning a fresh Keras optimizer.
        configure: a function that freezes or unfreezes the model for this phase.
        monitor: checkpoint metric, ``"val_loss"`` or ``"val_accuracy"``.
    """

    name: str
    title: str
    epochs: int
    batch_size: int
    optimizer: object
    configure: object
    monitor: str


def train_phases(output_dir, phases, build_model, compile_model, make_data, steps_per_epoch=None, strategy=None):
    """Runs the phases in order, each from the previous phase's best checkpoint.

    The first phase that runs starts from ``build_model()``. Each writes the files of
    ``run_phase`` and a ``<phase>_curves.png`` plot.

    Args:
        output_dir: where everything goes.
        phases: ``Phase`` objects, in order.
        build_model: returns a new model (used when no earlier phase ran).
        compile_model: ``compile_model(model, optimizer)``.
        make_data: ``make_data(batch_size) -> (train_data, val_data)``.
        steps_per_epoch: batches per epoch (default: all).
        strategy: a ``tf.distribute`` strategy (``helpers.distribute``): the model is
            built or loaded, compiled and fitted inside its scope. Default: none.

    Returns:
        The path of the last phase's best checkpoint.
    """
    multi_worker = multiworker.is_multi_worker(strategy)
    output_dir = multiworker.worker_dir(output_dir) if multi_worker else Path(output_dir)
    previous = None
    for phase in phases:
        if phase.epochs and not phase_complete(output_dir, phase.name):
            with distribute.scope(strategy):
                model = keras.saving.load_model(previous) if previous else build_model()
                phase.configure(model)
                compile_model(model, phase.optimizer())
                if previous is None:
                    model.summary(print_fn=logger.info, line_length=110)
                train_data, val_data = make_data(phase.batch_size)
                if multi_worker:  # model.fit fails there: the custom loop
                    multiworker.run_phase(model, phase.name, train_data, phase.epochs, output_dir, strategy,
                                          phase.monitor, steps_per_epoch=steps_per_epoch)
                else:
                    replicas = strategy.num_replicas_in_sync if strategy else 1
                    train_data = replica_safe(train_data, replicas, "training")
                    val_data = replica_safe(val_data, replicas, "validation")
                    run_phase(model, phase.name, train_data, val_data, phase.epochs, output_dir,
                              monitor=phase.monitor, steps_per_epoch=steps_per_epoch)
        if phase.epochs:
            previous = output_dir / f"{phase.name}_best.keras"
        history = read_history(output_dir / f"{phase.name}_log.csv")
        if history:
            reports.plot_history(history, output_dir / f"{phase.name}_curves.png", phase.title)
    return previous


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
        ValueError: the data is smaller than one global batch.
    """
    if replicas <= 1 or not isinstance(data, keras.utils.PyDataset):
        return data
    batches = len(data)
    last = len(keras.tree.flatten(data[batches - 1])[0])
    if last >= replicas:
        return data
    if batches == 1:
        raise ValueError(f"the {what} data holds {last} examples, fewer than the {replicas} replicas; "
                         "add data or use fewer devices")
    return LeadingBatches(data, batches - 1)


def read_history(csv_path):
    """Reads a CSVLogger file into ``{column: [values by epoch]}``.

    A row repeated for the same epoch (written just before an interruption and
    again on resume) counts once, the last one winning.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        return {}
    rows = {}
    with csv_path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            rows[int(row["epoch"])] = row
    history = {}
    for epoch in sorted(rows):
        for key, value in rows[epoch].items():
            history.setdefault(key, []).append(float(value) if value not in ("", None) else math.nan)
    return history


def load_checkpoint(path):
    """``keras.saving.load_model(path)`` (safe mode), with a clear error for a missing file.

    Returns:
        ``(model, classes)``: ``classes`` is the ``classes.json`` written beside the
        model at training time (``{"class_names": [...], ...}``), or ``{}``.

    Raises:
        FileNotFoundError: naming the path.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Model file {path} does not exist.")
    classes_path = path.with_name("classes.json")
    classes = json.loads(classes_path.read_text()) if classes_path.is_file() else {}
    return keras.saving.load_model(path), classes


def progress_verbosity():
    """Keras ``verbose``: a progress bar on a terminal, one line per epoch in a log file."""
    return 1 if sys.stdout.isatty() else 2


def phase_complete(output_dir, phase):
    """True when ``phase`` finished in ``output_dir`` (its ``<phase>_done.json`` exists)."""
    return (Path(output_dir) / f"{phase}_done.json").is_file()


def run_phase(
    model,
    phase,
    train_data,
    val_data,
    epochs,
    output_dir,
    monitor="val_loss",
    steps_per_epoch=None,
    callbacks=(),
    validation_steps=None,
):
    """Fits one training phase with checkpoints, logs and resume.

    Resumable: if the process dies mid-epoch, running it again restores the last
    completed epoch (``keras.callbacks.BackupAndRestore``); a completed phase
    (``<phase>_done.json`` present) is skipped. A NaN loss raises ``NaNLossError``.

    Args:
        model: a compiled ``keras.Model``.
        phase: name used for the files (``"phase1"``).
        train_data, val_data: anything ``model.fit`` accepts (a Keras
            ``PyDataset`` such as the generator's iterator, or a ``tf.data.Dataset``).
        epochs: epochs to train; 0 skips the phase.
        output_dir: where the files go.
        monitor: ``"val_loss"`` (lower is better) or a ``val_`` accuracy (higher).
        steps_per_epoch: batches per epoch (default: the whole training set).
        callbacks: extra Keras callbacks.
        validation_steps: validation batches per epoch (default: all).

    Returns:
        The path of the best checkpoint, or ``None`` when the phase did not run
        (``epochs == 0``).

    Raises:
        NaNLossError: the loss became NaN or infinite.
    """
    output_dir = Path(output_dir)
    best_path = output_dir / f"{phase}_best.keras"
    done_path = output_dir / f"{phase}_done.json"
    if epochs <= 0:
        logger.info("%s: skipped (0 epochs)", phase)
        return None
    if phase_complete(output_dir, phase):
        logger.info("%s: already complete (%s); not run again", phase, done_path)
        return best_path

    csv_path = output_dir / f"{phase}_log.csv"
    mode = "min" if "loss" in monitor else "max"
    past = read_history(csv_path).get(monitor, [])
    best_so_far = (min if mode == "min" else max)(past) if past and best_path.is_file() else None
    if len(past) >= epochs and best_path.is_file():  # killed after the last epoch
        logger.info("%s: all %d epochs are logged; marking the phase complete", phase, epochs)
        done_path.write_text(json.dumps({"epochs": epochs, "epochs_run": 0, "first_epoch": epochs}))
        return best_path
    if past:
        logger.info("%s: resuming after %d logged epochs (best %s %.4f)", phase, len(past), monitor,
                    math.nan if best_so_far is None else best_so_far)
    all_callbacks = [
        StopOnNaN(phase),
        keras.callbacks.BackupAndRestore(str(output_dir / "backup" / phase)),
        keras.callbacks.ModelCheckpoint(
            str(best_path), monitor=monitor, mode=mode, save_best_only=True,
            initial_value_threshold=best_so_far,
        ),
        keras.callbacks.CSVLogger(str(csv_path), append=True),
        keras.callbacks.TensorBoard(str(output_dir / "logs" / phase)),
        *callbacks,
    ]
    history = model.fit(
        train_data,
        shuffle=not isinstance(train_data, tf.data.Dataset),  # a tf.data pipeline shuffles itself
        validation_data=val_data,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        validation_steps=validation_steps,
        callbacks=all_callbacks,
        verbose=progress_verbosity(),
    )
    backup_root = output_dir / "backup"
    if backup_root.is_dir() and not any(backup_root.iterdir()):
        shutil.rmtree(backup_root)
    if not best_path.is_file():  # e.g. every val loss was NaN
        model.save(best_path)
    done_path.write_text(
        json.dumps({"epochs": epochs, "epochs_run": len(history.epoch),
                    "first_epoch": history.epoch[0] if history.epoch else epochs}, indent=1)
    )
    return best_path
