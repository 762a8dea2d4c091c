"""The training core the scripts share: freezing, and each phase's ``fit`` with the
project's callbacks, resume and NaN stop.

A script's ``train()`` tells the story itself, as keras-io's fine-tuning guide
(``examples/vision/image_classification_efficientnet_fine_tuning.py``) does::

    trainer = training.Trainer(args.output_dir, strategy, steps_per_epoch=args.steps_per_epoch)
    with trainer.scope():
        model = build_model(...)
        training.set_backbone_trainable(model, "xception", False)        # freeze
        model.compile(optimizer=keras.optimizers.RMSprop(), ...)
        best = trainer.fit(model, "phase1", train, val, epochs=3, monitor="val_loss")
        model = training.best_model(best, model)
        training.set_backbone_trainable(model, "xception", True)         # unfreeze
        model.compile(optimizer=keras.optimizers.Adam(1e-4), ...)
        best = trainer.fit(model, "phase2", train, val, epochs=3, monitor="val_accuracy")

``Trainer.fit`` owns the run directory (``helpers.rundir``): the best checkpoint,
the CSV and TensorBoard logs, ``BackupAndRestore`` resume, the NaN stop, skipping a
finished phase and the phase's curves.
"""

import json
import logging
import math
import shutil
import sys
from pathlib import Path

import keras
import tensorflow as tf

from helpers import distribute, multiworker, reports, rundir
from helpers.errors import MissingFileError, NaNLossError

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

    Args:
        output_dir: the run's folder (``helpers.rundir``); under multi-worker training
            the chief writes there and the other workers into their ``worker_dir``.
        strategy: a ``tf.distribute`` strategy (``helpers.distribute``) or ``None``.
        steps_per_epoch: batches per epoch (default: the whole training set).
    """

    def __init__(self, output_dir, strategy=None, steps_per_epoch=None):
        self.strategy = strategy
        self.multi_worker = multiworker.is_multi_worker(strategy)
        self.run = rundir.RunDir(multiworker.worker_dir(output_dir) if self.multi_worker else output_dir)
        self.steps_per_epoch = steps_per_epoch

    def scope(self):
        """The strategy's scope (a no-op without one): build, load and compile inside it."""
        return distribute.scope(self.strategy)

    def fit(self, model, phase, train_data, val_data, *, epochs, monitor, title=None):
        """Fits one phase: ``model.fit`` with the project's callbacks, resumable.

        Each epoch is logged to ``<phase>_log.csv`` and TensorBoard; the best epoch by
        ``monitor`` is saved as ``<phase>_best.keras``; ``BackupAndRestore`` keeps the
        last finished epoch, so the same command resumes a killed run there. A phase
        with ``<phase>_done.json`` is skipped; a NaN loss stops it (``NaNLossError``)
        before anything of the broken epoch is saved. The phase's curves are plotted.

        Args:
            model: a compiled ``keras.Model``.
            phase: the files' prefix, ``"phase1"`` or ``"phase2"``.
            train_data, val_data: anything ``model.fit`` takes (a ``keras.utils.PyDataset``
                or ``tf.data.Dataset``); ``multiworker.ShardedInput``s under multi-worker.
            epochs: epochs of the phase; 0 skips it.
            monitor: ``"val_loss"`` (lower is better) or a ``val_`` accuracy (higher).
            title: the curves' title (default: ``phase``).

        Returns:
            The path of the best checkpoint, or ``None`` when the phase did not run
            (``epochs == 0``).

        Raises:
            NaNLossError: the loss became NaN or infinite.
        """
        run = self.run
        if epochs <= 0:
            logger.info("%s: skipped (0 epochs)", phase)
            return None
        best = run.best(phase)
        if run.phase_complete(phase):
            logger.info("%s: already complete (%s); skipped", phase, run.done(phase))
            return best
        mode = "min" if "loss" in monitor else "max"
        past = rundir.read_history(run.log(phase)).get(monitor, [])
        best_so_far = (min if mode == "min" else max)(past) if past and best.is_file() else None
        if len(past) >= epochs and best.is_file() and not self.multi_worker:  # killed after the last epoch
            logger.info("%s: all %d epochs are logged; marking the phase complete", phase, epochs)
            return self._finish(model, phase, epochs, first_epoch=epochs, title=title)
        if past:
            logger.info("%s: resuming after %d logged epochs (best %s %.4f)", phase, len(past), monitor,
                        math.nan if best_so_far is None else best_so_far)
        callbacks = [
            StopOnNaN(phase),
            keras.callbacks.ModelCheckpoint(str(best), monitor=monitor, mode=mode, save_best_only=True,
                                            initial_value_threshold=best_so_far),
            keras.callbacks.CSVLogger(str(run.log(phase)), append=True),
            keras.callbacks.TensorBoard(str(run.tensorboard(phase))),
        ]
        if self.multi_worker:  # model.fit fails there (keras-team/keras#20585): fit's loop
            chief = multiworker.is_chief_process(self.strategy)
            first = multiworker.fit(model, train_data, val_data, epochs, callbacks, self.strategy, run.backup(phase),
                                    self.steps_per_epoch, verbose=progress_verbosity() if chief else 0, name=phase)
        else:
            replicas = self.strategy.num_replicas_in_sync if self.strategy else 1
            history = model.fit(
                distribute.replica_safe(train_data, replicas, "training"),
                validation_data=distribute.replica_safe(val_data, replicas, "validation"),
                shuffle=not isinstance(train_data, tf.data.Dataset),  # a tf.data pipeline shuffles itself
                epochs=epochs,
                steps_per_epoch=self.steps_per_epoch,
                callbacks=[keras.callbacks.BackupAndRestore(str(run.backup(phase))), *callbacks],
                verbose=progress_verbosity(),
            )
            first = history.epoch[0] if history.epoch else epochs
        return self._finish(model, phase, epochs, first_epoch=first, title=title)

    def _finish(self, model, phase, epochs, first_epoch, title):
        """Marks a phase complete (``<phase>_done.json``), after making sure its best
        checkpoint exists, and plots its curves."""
        run = self.run
        if run.backup_root.is_dir() and not any(run.backup_root.iterdir()):
            shutil.rmtree(run.backup_root)
        if not run.best(phase).is_file():  # e.g. every validation loss was NaN
            model.save(run.best(phase))
        run.done(phase).write_text(json.dumps(
            {"epochs": epochs, "epochs_run": epochs - first_epoch, "first_epoch": first_epoch}, indent=1))
        history = rundir.read_history(run.log(phase))
        if history:
            reports.plot_history(history, run.curves(phase), title or phase)
        return run.best(phase)


def load_checkpoint(path):
    """``keras.saving.load_model(path)`` (safe mode), with a clear error for a missing file.

    Returns:
        ``(model, classes)``: ``classes`` is the ``classes.json`` written beside the
        model at training time (``{"class_names": [...], ...}``), or ``{}``.

    Raises:
        MissingFileError: naming the path.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"Model file {path} does not exist.")
    classes_path = rundir.classes_beside(path)
    classes = json.loads(classes_path.read_text()) if classes_path.is_file() else {}
    return keras.saving.load_model(path), classes


def progress_verbosity():
    """Keras ``verbose``: a progress bar on a terminal, one line per epoch in a log file."""
    return 1 if sys.stdout.isatty() else 2
