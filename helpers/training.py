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

import functools
import json
import logging
import math
import shutil
import sys
import zipfile
from pathlib import Path

import keras
import numpy as np

from helpers import backend, distribute, multiworker, precision, reports, rundir
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
    found = next((layer for layer in precision.all_layers(model)[1:] if layer.name == name), None)
    if found is not None:
        return found
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
            ``top_layers`` layers (the LRCN seed fine-tunes VGG16's top 5), a global pooling
            layer on top not counted; ``None`` unfreezes all.

    Returns:
        The number of trainable weight tensors in the backbone.
    """
    backbone = find_layer(model, backbone_name)
    backbone.trainable = trainable
    if trainable:
        # The top N of the backbone's own layers: a ``pooling=`` layer on top (no weights) is not counted,
        # so N means the same with and without it (``helpers.backbones.Backbone.layers``).
        pooled = isinstance(backbone.layers[-1], (keras.layers.GlobalAveragePooling2D, keras.layers.GlobalMaxPooling2D))
        first_trainable = len(backbone.layers) - pooled - top_layers if top_layers is not None else 0
        # Every layer set here, not only the frozen ones: on TensorFlow, ``backbone.trainable = True``
        # does not reach the layers of a functional backbone, so an earlier call's frozen layers
        # would stay frozen.
        for index, layer in enumerate(backbone.layers):
            layer.trainable = index >= first_trainable and (
                train_batchnorm or not isinstance(layer, keras.layers.BatchNormalization))
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
        lr_schedule: each phase's learning rate (``learning_rate``): ``"constant"``,
            ``"cosine"`` or ``"plateau"`` (``keras.callbacks.ReduceLROnPlateau`` on the
            phase's monitored metric: divided by 5 after 2 epochs without improvement).
        warmup_epochs: linear warm-up from 0 over each phase's first epochs
            (``"constant"`` and ``"cosine"``).
        early_stopping: stop a phase after this many epochs without improvement of
            its monitored metric (``keras.callbacks.EarlyStopping``); ``None``: off.
    """

    PLATEAU_FACTOR, PLATEAU_PATIENCE = 0.2, 2

    def __init__(self, output_dir, strategy=None, steps_per_epoch=None, lr_schedule="constant", warmup_epochs=0,
                 early_stopping=None):
        self.strategy = strategy
        self.multi_worker = multiworker.is_multi_worker(strategy)  # TensorFlow's: fit's loop of our own
        self.chief = distribute.is_chief(strategy)
        self.run = rundir.RunDir(distribute.output_folder(strategy, output_dir))
        self.steps_per_epoch = steps_per_epoch
        self.lr_schedule, self.warmup_epochs, self.early_stopping = lr_schedule, warmup_epochs, early_stopping

    def learning_rate(self, base, epochs, train_data):
        """A phase's ``learning_rate`` for its optimizer, as ``lr_schedule`` asks.

        ``"constant"`` and ``"plateau"`` give ``base`` (a float; plateau lowers it from a
        callback); ``"cosine"`` a ``keras.optimizers.schedules.CosineDecay`` from ``base``
        to 0 over the phase's batches. With ``warmup_epochs`` the rate first rises
        linearly from 0 to ``base`` over those epochs' batches (``CosineDecay``'s
        ``warmup_target``; for ``"constant"`` with ``alpha=1``, no decay after it).
        A schedule's position is the optimizer's step count, which the epoch backups
        hold, so a resumed phase continues it where it stopped.

        Args:
            base: the phase's learning rate (> 0).
            epochs: the phase's epochs.
            train_data: the phase's training input (its batches per epoch, unless
                ``steps_per_epoch`` is set), or ``None`` when the phase will not run (``base``).

        Raises:
            UsageError: a schedule needs the batches per epoch and the input does not
                know them (then give ``--steps-per-epoch``).
        """
        if (self.lr_schedule == "plateau" or (self.lr_schedule == "constant" and not self.warmup_epochs)
                or train_data is None or epochs <= 0):
            return base
        steps = self.steps(train_data, warn=False) or _batches(train_data)
        if not steps:
            raise UsageError(f"--lr-schedule {self.lr_schedule} needs the batches per epoch, which this input does "
                             "not know; give --steps-per-epoch.")
        warmup = self.warmup_epochs * steps
        alpha = 1.0 if self.lr_schedule == "constant" else 0.0
        if not warmup:
            return keras.optimizers.schedules.CosineDecay(base, decay_steps=epochs * steps, alpha=alpha)
        return keras.optimizers.schedules.CosineDecay(0.0, decay_steps=max(1, (epochs - self.warmup_epochs) * steps),
                                                      alpha=alpha, warmup_target=base, warmup_steps=warmup)

    def steps(self, train_data, warn=True, phase=""):
        """Batches per epoch for ``model.fit``: ``steps_per_epoch`` (``None``: the whole training
        data), capped at the data's own batches when it knows them, since ``fit`` stops an epoch
        when the data runs out; the cap is logged as a warning (``warn``), and the learning-rate
        schedule follows it."""
        batches = None if isinstance(train_data, multiworker.ShardedInput) else _batches(train_data)  # repeats
        if self.steps_per_epoch and batches and self.steps_per_epoch > batches:
            if warn:
                logger.warning("%s: --steps-per-epoch %d is more than the %d batches of the training data; each "
                               "epoch runs %d (the whole training set once).", phase, self.steps_per_epoch, batches,
                               batches)
            return batches
        return self.steps_per_epoch

    def scope(self):
        """The strategy's scope (a no-op without one): build, load and compile inside it."""
        return distribute.scope(self.strategy)

    def phase_complete(self, phase):
        """Whether ``phase`` is complete (``<phase>_done.json``): in every process of a multi-process
        run (``distribute.everywhere``), so that all of them skip it or all train it (a process
        whose own folder was lost trains it again with the others, from their agreed backup)."""
        return distribute.everywhere(self.strategy, self.run.phase_complete(phase))

    def __enter__(self):
        """Takes the run directory's lock (``rundir.RunDir.lock``) until ``__exit__``."""
        self._lock = self.run.lock()
        self._lock.__enter__()
        return self

    def __exit__(self, *exc_info):
        return self._lock.__exit__(*exc_info)

    def fit(self, model, phase, train_data, val_data, *, epochs, monitor, title=None, save=None, class_weight=None,
            callbacks=()):
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
            phase: the files' prefix: ``"phase1"``, ``"phase2"`` or the captioner's ``"phase3"``.
            train_data, val_data: anything ``model.fit`` takes (a ``keras.utils.PyDataset``
                or ``tf.data.Dataset``); ``multiworker.ShardedInput``s under multi-worker.
            epochs: epochs of the phase; 0 skips it.
            monitor: ``"val_loss"`` (lower is better), or a higher-is-better ``val_`` metric:
                ``"val_accuracy"``, or ``"val_cider_d"`` (a callback adds it to the logs).
            title: the curves' title (default: ``phase``).
            save: the model the best checkpoint holds (default: ``model``): a larger model
                sharing ``model``'s layers, e.g. the whole captioner while its decoder is
                fitted on cached backbone features.
            class_weight: ``{class index: loss weight}`` for ``model.fit`` (``balanced_class_weights``).
            callbacks: more ``keras.callbacks.Callback``s, called first at each epoch's end (they may
                add the ``monitor``ed value to the logs).

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
        if self.phase_complete(phase):
            logger.info("%s: skipped, already complete (%s)", phase, run.done(phase))
            return run.best(phase)
        past = rundir.read_history(run.log(phase)).get(monitor, [])
        best_so_far = (min if "loss" in monitor else max)(past) if past and run.best(phase).is_file() else None
        callbacks = [
            *callbacks,
            StopOnNaN(phase),
            LogLearningRate(),
            BestCheckpoint(run.best(phase), monitor, best=best_so_far, save=save),
            keras.callbacks.CSVLogger(str(run.log(phase)), append=True),
        ]
        if backend.has_tensorflow():  # its event files are written with TensorFlow's summary ops
            callbacks.append(keras.callbacks.TensorBoard(str(run.tensorboard(phase))))
        else:
            logger.info("%s: no TensorBoard logs (they need TensorFlow, which this environment does not have); "
                        "the CSV log and the curves are written", phase)
        if self.lr_schedule == "plateau":
            callbacks.append(ResumableReduceLROnPlateau(past, monitor=monitor, factor=self.PLATEAU_FACTOR,
                                                        patience=self.PLATEAU_PATIENCE))
        if self.early_stopping:
            stopper = ResumableEarlyStopping(past, monitor=monitor, patience=self.early_stopping)
            if stopper.replay() and run.best(phase).is_file():  # stopped before a kill; only the marker is missing
                logger.info("%s: already stopped early after %d epochs", phase, len(past))
                return self._finish(save or model, phase, epochs, first_epoch=len(past), title=title)
            callbacks.append(stopper)
        try:
            if self.multi_worker:  # model.fit fails there (keras-team/keras#20585): fit's loop
                if class_weight:
                    raise UsageError("class weights are not available with multi-worker training.")
                first = multiworker.fit(model, train_data, val_data, epochs, callbacks, self.strategy,
                                        run.backup(phase), self.steps_per_epoch,
                                        verbose=progress_verbosity() if self.chief else 0, name=phase)
            else:
                # Several JAX processes: the same epoch in every process, each from its own backup.
                agree = functools.partial(distribute.agreed_epoch, self.strategy, phase=phase, folder=run.backup(phase))
                first = restore_backup(model, run.backup(phase), phase,
                                       agree if distribute.process_count(self.strategy) > 1 else None)
                ordered = isinstance(train_data, distribute.ProcessSlices)  # its batches in its own order
                if first:
                    logger.info("%s: resuming after %d completed epochs (best %s so far: %s)", phase, first,
                                monitor, "none" if best_so_far is None else f"{best_so_far:.4f}")
                replicas = self.strategy.num_replicas_in_sync if self.strategy else 1
                if self.strategy is None:
                    build_before_tracing(model, train_data)
                model.fit(
                    distribute.replica_safe(train_data, replicas, "training"),
                    validation_data=distribute.replica_safe(val_data, replicas, "validation"),
                    shuffle=not (ordered or backend.is_tf_dataset(train_data)),  # tf.data shuffles itself
                    initial_epoch=first,
                    epochs=epochs,
                    steps_per_epoch=self.steps(train_data, phase=phase),
                    callbacks=[*callbacks, EpochBackup(run.backup(phase))] + (
                        [distribute.EpochOrder(train_data)] if ordered else []),
                    class_weight=class_weight,
                    verbose=progress_verbosity(),
                )
        except Exception as error:
            if rundir.is_disk_full(error):
                raise rundir.DiskFullError(run.path, needed_bytes=4 * saved_bytes(model)) from error
            raise
        if model.stop_training:
            logger.info("%s: stopped early: %s did not improve for %d epochs", phase, monitor, self.early_stopping)
        return self._finish(save or model, phase, epochs, first_epoch=first, title=title)

    def _finish(self, model, phase, epochs, first_epoch, title):
        """Marks a phase complete (``<phase>_done.json``) once its best checkpoint is whole,
        removes its backups and plots its curves."""
        run = self.run
        best = run.best(phase)
        if not best.is_file():  # e.g. every validation loss was NaN
            rundir.write_atomically(best, lambda path: save_lean(model, path))
        check_checkpoint(best)
        history = rundir.read_history(run.log(phase))
        completed = min(epochs, len(history.get("epoch", []))) or epochs  # fewer when stopped early
        rundir.write_text(run.done(phase), json.dumps(
            {"epochs": epochs, "epochs_completed": completed, "epochs_run": completed - first_epoch,
             "first_epoch": first_epoch, "stopped_early": completed < epochs}, indent=1))
        shutil.rmtree(run.backup(phase), ignore_errors=True)
        if run.backup_root.is_dir() and not any(run.backup_root.iterdir()):
            shutil.rmtree(run.backup_root, ignore_errors=True)
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
            rundir.write_atomically(self.path, lambda path: save_lean(self.saved_model or self.model, path))


def save_lean(model, path):
    """Saves ``model`` as a ``.keras`` file for inference: architecture and weights, without
    any optimizer state or compile configuration (with Adam, a third of the size).

    Keras 3 ignores ``include_optimizer=False`` for ``.keras`` files and also writes the
    optimizer of a compiled nested model (the captioner's decoder), so every optimizer in
    ``model`` is detached for the write and put back after it. A loaded lean model
    predicts at once; training it needs ``compile`` (as each phase does).
    """
    models = {id(m): m for m in precision.all_layers(model) if isinstance(m, keras.Model)}.values()
    saved = [(m, m.optimizer, m.compiled) for m in models if getattr(m, "optimizer", None) is not None]  # compiled ones
    try:
        for m, _, _ in saved:
            m.optimizer, m.compiled = None, False
        keras.saving.save_model(model, path)
    finally:
        for m, optimizer, was_compiled in saved:
            m.optimizer, m.compiled = optimizer, was_compiled


class LogLearningRate(keras.callbacks.Callback):
    """Adds the optimizer's current learning rate to each epoch's logs (``learning_rate``),
    so the CSV log and TensorBoard record it; for a schedule, its value at the epoch's end."""

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and self.model.optimizer is not None:
            logs["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))


def _mode(monitor):
    return "min" if "loss" in monitor else "max"


class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """``keras.callbacks.EarlyStopping`` that goes on counting after a resume: the phase's
    earlier epochs (``past``, the monitored values from its CSV log) are replayed when
    training begins, so a killed and resumed phase stops at the same epoch as one that ran
    through. The best checkpoint (``BestCheckpoint``) keeps the best epoch's model."""

    def __init__(self, past, monitor, patience):
        super().__init__(monitor=monitor, patience=patience, mode=_mode(monitor))
        self.past = [float(v) for v in past]

    def replay(self):
        """Counts the past epochs; returns True when they had already used up the patience."""
        self.wait, self.best, self.stopped_epoch = 0, None, 0
        if self.monitor_op is None:
            self._set_monitor_op()
        for value in self.past:
            self.wait += 1
            if self._is_improvement(value, self.best):
                self.best, self.wait = value, 0
        return len(self.past) > 1 and self.wait >= self.patience

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self.replay()


class ResumableReduceLROnPlateau(keras.callbacks.ReduceLROnPlateau):
    """``keras.callbacks.ReduceLROnPlateau`` that goes on counting after a resume: the
    phase's earlier epochs (``past``) are replayed for its best value and wait count; the
    learning rate itself comes back with the optimizer's state from the epoch backup."""

    def __init__(self, past, monitor, factor, patience):
        super().__init__(monitor=monitor, factor=factor, patience=patience, mode=_mode(monitor), min_delta=0)
        self.past = [float(v) for v in past]

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        if self.monitor_op is None:
            self._set_monitor_op()
        for value in self.past:
            if self._is_improvement(value, self.best):
                self.best, self.wait = value, 0
            else:
                self.wait += 1
                if self.wait >= self.patience:  # it lowered the rate then
                    self.wait = 0


def balanced_class_weights(labels, num_classes):
    """``{class: samples / (num_classes * samples of class)}``: each class weighs as much in
    the loss as the others in all (scikit-learn's ``"balanced"``); a class without training
    samples gets 1.

    Args:
        labels: the training split's class index per sample, in ``[0, num_classes)``.
        num_classes: the number of classes.
    """
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)
    return {c: float(len(labels) / (num_classes * n)) if n else 1.0 for c, n in enumerate(counts)}


def _batches(data):
    """Batches per epoch of a phase's input, or ``None`` when it does not know."""
    if backend.is_tf_dataset(data):
        count = int(data.cardinality())
        return count if count > 0 else None
    if isinstance(data, multiworker.ShardedInput):
        return data.steps
    try:
        return len(data)
    except TypeError:
        return None


class EpochBackup(keras.callbacks.Callback):
    """Backs up the weights and optimizer state after every epoch into ``folder`` as
    ``epoch-<N>.weights.h5`` (N completed epochs), and the random-number states the weights
    leave out (``seed_states``: dropout's) as ``epoch-<N>.seeds.npz`` before it, both written
    atomically, keeping the last two epochs.

    In place of ``keras.callbacks.BackupAndRestore``, whose write in place left a run that
    could not resume when a kill fell inside it (and which restores no random state: a resumed
    phase drew the dropout masks of its first epochs again); ``restore_backup`` reads these."""

    def __init__(self, folder):
        super().__init__()
        self.folder = Path(folder)

    def on_epoch_end(self, epoch, logs=None):
        weights = self.folder / f"epoch-{epoch + 1}.weights.h5"
        states = [keras.ops.convert_to_numpy(v.value) for v in seed_states(self.model)]
        if states:
            def write(path):
                with open(path, "wb") as file:
                    np.savez(file, *states)

            rundir.write_atomically(_seeds_of(weights), write)
        rundir.write_atomically(weights, self.model.save_weights)
        for _, old in sorted(_backups(self.folder))[:-2]:
            old.unlink(missing_ok=True)
            _seeds_of(old).unlink(missing_ok=True)


def seed_states(model):
    """``model``'s random-number states (each ``keras.random.SeedGenerator``'s, as dropout holds):
    variables that ``save_weights`` leaves out, in a fixed order."""
    return [v for v in model.variables if v.path.endswith("seed_generator_state")]


def _seeds_of(weights):
    """The ``.seeds.npz`` file beside a backup's ``.weights.h5``."""
    return Path(weights).with_name(Path(weights).name[:-len(".weights.h5")] + ".seeds.npz")


def _backups(folder):
    """``[(completed_epochs, path)]`` of the backups in ``folder``."""
    found = []
    for path in Path(folder).glob("epoch-*.weights.h5"):
        number = path.name[len("epoch-"):-len(".weights.h5")]
        if number.isdigit():
            found.append((int(number), path))
    return found


def build_before_tracing(model, train_data):
    """Creates ``model``'s optimizer and metric variables before ``fit`` traces its train step.

    Without a distribution strategy Keras on TensorFlow creates them inside the step's first
    trace, and ``tf.function`` then traces the step a second time (its rule for a function that
    creates variables): a second trace of the whole forward and backward pass at the start of
    every phase. Keras builds them first (``Trainer._symbolic_build``, from the shapes and dtypes
    of one batch) under a strategy and on the other backends; this does the same here. A no-op
    off TensorFlow, once built, or where that Keras method is missing (the step is then traced twice,
    as before).

    Args:
        model: a compiled ``keras.Model``.
        train_data: a ``tf.data.Dataset`` (its ``element_spec`` is read, nothing of the data)
            or a ``keras.utils.PyDataset`` (its first batch is read).
    """
    build = getattr(model, "_symbolic_build", None)
    optimizer_built = model.optimizer is None or model.optimizer.built
    metrics = getattr(model, "_compile_metrics", None)
    if not backend.is_tensorflow() or build is None or (optimizer_built and (metrics is None or metrics.built)):
        return
    batch = train_data.element_spec if backend.is_tf_dataset(train_data) else train_data[0]
    build(data_batch=batch)


def restore_backup(model, folder, phase, agree=None):
    """Loads the newest whole backup of ``EpochBackup`` into ``model`` (weights and
    optimizer state); a damaged one is reported in one line and the one before it tried.

    Args:
        agree: for several processes, ``agree(saved epochs)`` -> the epoch all of them restore
            (``helpers.distribute.agreed_epoch``); that backup alone is loaded.

    Returns:
        The number of completed epochs restored (0: none, start the phase).
    """
    backups = sorted(_backups(folder), reverse=True)
    if agree is not None:
        first = agree([epoch for epoch, _ in backups])
        backups = [(epoch, path) for epoch, path in backups if epoch == first]
    for epoch, path in backups:
        try:
            if model.optimizer is not None and not model.optimizer.built:
                model.optimizer.build(model.trainable_variables)
            model.load_weights(path)
            _restore_seed_states(model, _seeds_of(path))
            return epoch
        except Exception as error:  # h5py and Keras raise several types for a damaged file
            logger.warning("%s: the backup %s is damaged (%s: %s); trying the one before it", phase, path,
                           type(error).__name__, str(error).splitlines()[0][:200] if str(error) else "")
    if agree is not None and backups:  # the others restored that epoch: this process cannot start over alone
        raise UsageError(f"{phase}: the backup {backups[0][1]} is damaged; delete every process's {folder} folder "
                         "to restart the phase.")
    return 0


def _restore_seed_states(model, path):
    """Assigns the random-number states of ``path`` (``EpochBackup``) to ``model``'s, where the file
    exists and matches them (a backup of an earlier version has none: the states stay as built)."""
    if not path.is_file():
        return
    with np.load(path) as saved:
        states = [saved[f"arr_{i}"] for i in range(len(saved.files))]
    variables = seed_states(model)
    if [s.shape for s in states] == [tuple(v.shape) for v in variables]:
        for variable, state in zip(variables, states):
            variable.assign(state)


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


# What a saved model is, read from the name its builder gives it (and a ``.keras`` file carries).
MODEL_KINDS = {"cnn_rnn_classifier": "classifier", "cnn_classifier": "classifier", "lrcn": "lrcn",
               "captioner": "captioner"}
KIND_DESCRIPTIONS = {"classifier": "an image classifier (cnn_rnn_classifier.py)", "lrcn": "an LRCN (lrcn.py)",
                     "captioner": "a captioner (captioning.py)"}


def describe_kind(model_name):
    """What a model of this name is, for messages: ``"an LRCN (lrcn.py)"``."""
    kind = MODEL_KINDS.get(model_name)
    if kind is None:
        return f"a model named {model_name!r}, which no script of this project builds"
    return KIND_DESCRIPTIONS[kind]


def check_kind(model_name, kind, source):
    """Refuses a model of another kind than ``kind`` (a key of ``KIND_DESCRIPTIONS``).

    Args:
        model_name: the model's name (``keras.Model.name``, or a ``.keras`` file's ``saved_model_name``).
        kind: ``"classifier"``, ``"lrcn"`` or ``"captioner"``.
        source: the model's file or ``"the model"``, for the message.

    Raises:
        UsageError: naming both kinds, e.g. ``runs/x/phase2_best.keras is an LRCN (lrcn.py), not an
            image classifier (cnn_rnn_classifier.py).``
    """
    if MODEL_KINDS.get(model_name) != kind:
        raise UsageError(f"{source} is {describe_kind(model_name)}, not {KIND_DESCRIPTIONS[kind]}; use the script "
                         "that trained it.")


def saved_model_name(path):
    """The name of the model a ``.keras`` file holds, read from its ``config.json`` without loading
    the weights, or ``None`` when the archive has no readable model config."""
    try:
        with zipfile.ZipFile(path) as archive:
            config = json.loads(archive.read("config.json"))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None
    inner = config.get("config") if isinstance(config, dict) else None
    return inner.get("name") if isinstance(inner, dict) else None


def load_checkpoint(path, kind):
    """``keras.saving.load_model(path)`` (safe mode) of a model of ``kind``, with one-line errors.

    The kind is checked from the file's own config before its weights are loaded.

    Args:
        path: a ``.keras`` file.
        kind: what the calling script serves: ``"classifier"``, ``"lrcn"`` or ``"captioner"``.

    Returns:
        ``(model, classes)``: ``classes`` is the ``classes.json`` written beside the
        model at training time (``{"class_names": [...], ...}``), or ``{}``.

    Raises:
        MissingFileError: no such file.
        UsageError: the file is damaged (cut short, a bad CRC), holds another kind of model
            (both kinds named), or is not a model this script can load (not a ``.keras`` file).
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"Model file {path} does not exist.")
    check_checkpoint(path)
    name = saved_model_name(path)
    if name is None:
        raise UsageError(f"{path} holds no Keras model config: it is not a .keras model saved by this project.")
    check_kind(name, kind, path)
    classes_path = rundir.classes_beside(path)
    classes = json.loads(classes_path.read_text(encoding="utf-8")) if classes_path.is_file() else {}
    try:
        return keras.saving.load_model(path), classes
    except Exception as error:  # Keras raises ValueError, TypeError, KeyError... for a foreign model
        first_line = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
        raise UsageError(f"{path} is not a model this script can load ({first_line}); was it saved by this "
                         "script?") from error


def model_and_classes(model, kind, class_names=None):
    """``(keras_model, class_names, descriptions)`` for prediction from a saved model or a loaded one.

    Args:
        model: the path of a saved ``.keras`` model (``load_checkpoint``; its class names
            and descriptions from the ``classes.json`` beside it) or a ``keras.Model``.
        kind: what the caller serves (``check_kind``): ``"classifier"`` or ``"lrcn"``.
        class_names: the model's classes in index order; default: the ``classes.json``
            beside a path, else ``"0"``, ``"1"``, ...

    Raises:
        MissingFileError, UsageError: as ``load_checkpoint`` (a loaded model of another kind
            too); ``class_names`` of the wrong length.
    """
    classes = {}
    if isinstance(model, keras.Model):
        check_kind(model.name, kind, "the model")
    else:
        model, classes = load_checkpoint(model, kind)
    count = model.output_shape[-1]
    names = list(class_names or classes.get("class_names") or [str(i) for i in range(count)])
    if len(names) != count:
        raise UsageError(f"the model predicts {count} classes; {len(names)} class names were given.")
    return model, names, classes.get("descriptions", {})


def progress_verbosity():
    """Keras ``verbose``: a progress bar on a terminal, one line per epoch in a log file."""
    return 1 if sys.stdout.isatty() else 2
