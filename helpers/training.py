"""The training core the scripts share: freezing, and each phase's ``fit`` with the
project's callbacks, resume and NaN stop.

A script's ``train()`` tells the story itself, as keras-io's fine-tuning guide
(``examples/vision/image_classification_efficientnet_fine_tuning.py``) does::

    with training.Trainer(args.output_dir, strategy) as trainer, trainer.scope():
        model = build_model(...)
        training.set_backbone_trainable(model, "xception", False)        # freeze
        model.compile(optimizer=keras.optimizers.RMSprop(), ...)
        best = trainer.fit(model, "phase1", train, val, epochs=3, monitor="val_loss")
        model = training.best_model(best, model)
        training.set_backbone_trainable(model, "xception", True)         # unfreeze
        model.compile(optimizer=keras.optimizers.Adam(1e-4), ...)
        best = trainer.fit(model, "phase2", train, val, epochs=3, monitor="val_accuracy")

``Trainer.fit`` owns the run directory (``helpers.rundir``): the best checkpoint,
the CSV and TensorBoard logs, resume from per-epoch backups, the NaN stop, skipping a
finished phase and the phase's curves, every file written atomically. ``with
Trainer(...)`` holds the run directory's lock, so a second run on it stops at once.
"""

import json
import logging
import math
import shutil
import sys
import zipfile
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from helpers import distribute, multiworker, reports, rundir
from helpers.errors import MissingFileError, NaNLossError, UsageError

logger = logging.getLogger(__name__)


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
        ValueError: no such layer (a programming error, not the user's).
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


def best_model(best, model):
    """The model to go on with after a phase: its best checkpoint ``best`` (loaded in
    safe mode, in the current strategy scope), or ``model`` when the phase did not run
    (``best`` is None)."""
    return keras.saving.load_model(best) if best else model


class Trainer:
    """Fits the phases of one run into its output directory.

    Use it as ``with Trainer(...) as trainer:``, which holds the run directory's lock.

    Args:
        output_dir: the run's folder (``helpers.rundir``); under multi-worker training
            the chief writes there and the other workers into their ``worker_dir``.
        strategy: a ``tf.distribute`` strategy (``helpers.distribute``) or ``None``.
        steps_per_epoch: batches per epoch (default: the whole training set).
    """

    def __init__(self, output_dir, strategy=None, steps_per_epoch=None):
        self.strategy = strategy
        self.multi_worker = multiworker.is_multi_worker(strategy)
        self.chief = multiworker.is_chief_process(strategy)
        self.run = rundir.RunDir(multiworker.worker_dir(output_dir) if self.multi_worker else output_dir)
        self.steps_per_epoch = steps_per_epoch

    def scope(self):
        """The strategy's scope (a no-op without one): build, load and compile inside it."""
        return distribute.scope(self.strategy)

    def __enter__(self):
        """Takes the run directory's lock (``rundir.RunDir.lock``) until ``__exit__``."""
        self._lock = self.run.lock()
        self._lock.__enter__()
        return self

    def __exit__(self, *exc_info):
        return self._lock.__exit__(*exc_info)

    def fit(self, model, phase, train_data, val_data, *, epochs, monitor, title=None, save=None):
        """Fits one phase: ``model.fit`` with the project's callbacks, resumable.

        Each epoch is logged to ``<phase>_log.csv`` and TensorBoard; the best epoch by
        ``monitor`` is saved as ``<phase>_best.keras``; the weights and optimizer state
        of the last two epochs are backed up, so the same command resumes a killed run
        after its last completed epoch (a damaged backup is reported and the one before
        it used). Every file is written atomically (``rundir.write_atomically``). The
        phase is marked complete (``<phase>_done.json``) only once its best checkpoint
        is whole; a complete phase is skipped. A NaN loss stops it (``NaNLossError``)
        before anything of the broken epoch is saved. The phase's curves are plotted.

        Args:
            model: a compiled ``keras.Model``.
            phase: the files' prefix, ``"phase1"`` or ``"phase2"``.
            train_data, val_data: anything ``model.fit`` takes (a ``keras.utils.PyDataset``
                or ``tf.data.Dataset``); ``multiworker.ShardedInput``s under multi-worker.
            epochs: epochs of the phase; 0 skips it.
            monitor: ``"val_loss"`` (lower is better) or a ``val_`` accuracy (higher).
            title: the curves' title (default: ``phase``).
            save: the model the best checkpoint holds (default: ``model``): a larger model
                sharing ``model``'s layers, e.g. the whole captioner while its decoder is
                fitted on cached backbone features.

        Returns:
            The path of the best checkpoint, or ``None`` when the phase did not run
            (``epochs == 0``).

        Raises:
            NaNLossError: the loss became NaN or infinite.
            rundir.DiskFullError: the disk filled up; the message says how much the run needs.
        """
        run = self.run
        if epochs <= 0:
            logger.info("%s: skipped (0 epochs)", phase)
            return None
        if run.phase_complete(phase):
            logger.info("%s: skipped, already complete (%s)", phase, run.done(phase))
            return run.best(phase)
        past = rundir.read_history(run.log(phase)).get(monitor, [])
        best_so_far = (min if "loss" in monitor else max)(past) if past and run.best(phase).is_file() else None
        callbacks = [
            StopOnNaN(phase),
            BestCheckpoint(run.best(phase), monitor, best=best_so_far, save=save),
            keras.callbacks.CSVLogger(str(run.log(phase)), append=True),
            keras.callbacks.TensorBoard(str(run.tensorboard(phase))),
        ]
        try:
            if self.multi_worker:  # model.fit fails there (keras-team/keras#20585): fit's loop
                first = multiworker.fit(model, train_data, val_data, epochs, callbacks, self.strategy,
                                        run.backup(phase), self.steps_per_epoch,
                                        verbose=progress_verbosity() if self.chief else 0, name=phase)
            else:
                first = restore_backup(model, run.backup(phase), phase)
                if first:
                    logger.info("%s: resuming after %d completed epochs (best %s so far: %s)", phase, first,
                                monitor, "none" if best_so_far is None else f"{best_so_far:.4f}")
                replicas = self.strategy.num_replicas_in_sync if self.strategy else 1
                model.fit(
                    distribute.replica_safe(train_data, replicas, "training"),
                    validation_data=distribute.replica_safe(val_data, replicas, "validation"),
                    shuffle=not isinstance(train_data, tf.data.Dataset),  # a tf.data pipeline shuffles itself
                    initial_epoch=first,
                    epochs=epochs,
                    steps_per_epoch=self.steps_per_epoch,
                    callbacks=[*callbacks, EpochBackup(run.backup(phase))],
                    verbose=progress_verbosity(),
                )
        except Exception as error:
            if rundir.is_disk_full(error):
                raise rundir.DiskFullError(run.path, needed_bytes=4 * saved_bytes(model)) from error
            raise
        return self._finish(save or model, phase, epochs, first_epoch=first, title=title)

    def _finish(self, model, phase, epochs, first_epoch, title):
        """Marks a phase complete (``<phase>_done.json``) once its best checkpoint is whole,
        removes its backups and plots its curves."""
        run = self.run
        best = run.best(phase)
        if not best.is_file():  # e.g. every validation loss was NaN
            rundir.write_atomically(best, model.save)
        check_checkpoint(best)
        rundir.write_text(run.done(phase), json.dumps(
            {"epochs": epochs, "epochs_run": epochs - first_epoch, "first_epoch": first_epoch}, indent=1))
        shutil.rmtree(run.backup(phase), ignore_errors=True)
        if run.backup_root.is_dir() and not any(run.backup_root.iterdir()):
            shutil.rmtree(run.backup_root, ignore_errors=True)
        history = rundir.read_history(run.log(phase))
        if history:
            reports.plot_history(history, run.curves(phase), title or phase)
        return best


class BestCheckpoint(keras.callbacks.Callback):
    """Saves the model whenever ``monitor`` improves, written atomically.

    ``keras.callbacks.ModelCheckpoint(save_best_only=True)`` rewrites its file in place,
    so a kill or a full disk during the write destroys the previous best model too; this
    writes to a temporary name and renames it into place (``rundir.write_atomically``).
    Epochs whose ``monitor`` is missing or not finite are not saved.

    Args:
        path: the ``.keras`` file.
        monitor: a ``logs`` key; ``loss`` in its name means lower is better.
        best: the best value so far (a resumed run), or ``None``.
        save: the model saved (default: the model being fitted).
    """

    def __init__(self, path, monitor, best=None, save=None):
        super().__init__()
        self.path, self.monitor, self.best, self.saved_model = Path(path), monitor, best, save
        self.better = (lambda a, b: a < b) if "loss" in monitor else (lambda a, b: a > b)

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is None or not math.isfinite(float(value)):
            return
        if self.best is None or self.better(float(value), self.best):
            logger.debug("epoch %d: %s improved to %.4f, saving %s", epoch + 1, self.monitor, value, self.path)
            self.best = float(value)
            rundir.write_atomically(self.path, (self.saved_model or self.model).save)


class EpochBackup(keras.callbacks.Callback):
    """Backs up the weights and optimizer state after every epoch into ``folder`` as
    ``epoch-<N>.weights.h5`` (N completed epochs), written atomically, keeping the last two.

    In place of ``keras.callbacks.BackupAndRestore``, whose write in place left a run that
    could not resume when a kill fell inside it; ``restore_backup`` reads these."""

    def __init__(self, folder):
        super().__init__()
        self.folder = Path(folder)

    def on_epoch_end(self, epoch, logs=None):
        rundir.write_atomically(self.folder / f"epoch-{epoch + 1}.weights.h5", self.model.save_weights)
        for _, old in sorted(_backups(self.folder))[:-2]:
            old.unlink(missing_ok=True)


def _backups(folder):
    """``[(completed_epochs, path)]`` of the backups in ``folder``."""
    found = []
    for path in Path(folder).glob("epoch-*.weights.h5"):
        number = path.name[len("epoch-"):-len(".weights.h5")]
        if number.isdigit():
            found.append((int(number), path))
    return found


def restore_backup(model, folder, phase):
    """Loads the newest whole backup of ``EpochBackup`` into ``model`` (weights and
    optimizer state); a damaged one is reported in one line and the one before it tried.

    Returns:
        The number of completed epochs restored (0: none, start the phase).
    """
    for epoch, path in sorted(_backups(folder), reverse=True):
        try:
            if model.optimizer is not None and not model.optimizer.built:
                model.optimizer.build(model.trainable_variables)
            model.load_weights(path)
            return epoch
        except Exception as error:  # h5py and Keras raise several types for a damaged file
            logger.warning("%s: the backup %s is damaged (%s: %s); trying the one before it", phase, path,
                           type(error).__name__, str(error).splitlines()[0][:200] if str(error) else "")
    return 0


def saved_bytes(model):
    """Bytes of a ``.keras`` file of ``model``: its variables and its optimizer's."""
    variables = list(model.variables) + list(model.optimizer.variables if model.optimizer else [])
    return sum(int(np.prod(v.shape)) * np.dtype(keras.backend.standardize_dtype(v.dtype)).itemsize
               for v in variables)


def check_checkpoint(path):
    """Raises ``UsageError`` naming ``path`` when the ``.keras`` file is not whole (a
    truncated or corrupt zip archive: a kill or a full disk during a write in place)."""
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (OSError, zipfile.BadZipFile) as error:
        damaged = str(error)
    if damaged is not None:
        raise UsageError(f"{path} is damaged ({damaged}): it was cut short or corrupted. Delete it to train "
                         "that phase again.")


def load_checkpoint(path):
    """``keras.saving.load_model(path)`` (safe mode), with one-line errors.

    Returns:
        ``(model, classes)``: ``classes`` is the ``classes.json`` written beside the
        model at training time (``{"class_names": [...], ...}``), or ``{}``.

    Raises:
        MissingFileError: no such file.
        UsageError: the file is damaged (cut short, a bad CRC) or is not a model this
            script can load (another script's model, not a ``.keras`` file).
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"Model file {path} does not exist.")
    check_checkpoint(path)
    classes_path = rundir.classes_beside(path)
    classes = json.loads(classes_path.read_text(encoding="utf-8")) if classes_path.is_file() else {}
    try:
        return keras.saving.load_model(path), classes
    except Exception as error:  # Keras raises ValueError, TypeError, KeyError... for a foreign model
        first_line = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
        raise UsageError(f"{path} is not a model this script can load ({first_line}); was it saved by this "
                         "script?") from error


def progress_verbosity():
    """Keras ``verbose``: a progress bar on a terminal, one line per epoch in a log file."""
    return 1 if sys.stdout.isatty() else 2
