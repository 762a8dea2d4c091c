"""helpers.training, the core every script trains through: learning-rate schedules, early
stopping and class weights (each resumed where a kill stopped it), and lean checkpoints."""

import json
import zipfile

import h5py
import keras
import numpy as np
import pytest

import cnn_rnn_classifier as crc
from helpers import backend, rundir, training
from tests.conftest import Killed, weights_never_drawn, write_jpeg

# ---------------------------------------------------------------- training controls


class Batches(keras.utils.PyDataset):
    """A fixed regression problem: y = x @ w (train) or its opposite (val: the better the
    fit, the worse the validation loss, so early stopping and the plateau schedule fire)."""

    def __init__(self, sign, batches=4):
        super().__init__()
        rng = np.random.default_rng(0)
        self.x = rng.normal(size=(batches, 8, 3)).astype("float32")
        self.y = sign * self.x @ np.array([[1.0], [-2.0], [0.5]], "float32")

    def __len__(self):
        return len(self.x)

    def __getitem__(self, index):
        return self.x[index], self.y[index]


def regression(learning_rate):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(1, name="dense")(inputs))
    model.compile(keras.optimizers.SGD(learning_rate), "mse")
    return model


def fit_regression(folder, epochs=6, **controls):
    trainer = training.Trainer(folder, **controls)
    train = Batches(1.0)
    model = regression(trainer.learning_rate(0.05, epochs, train))
    with trainer:
        trainer.fit(model, "phase1", train, Batches(-1.0), epochs=epochs, monitor="val_loss")
    return rundir.read_history(rundir.RunDir(folder).log("phase1"))


def killed_then_resumed(folder, monkeypatch, completed, **controls):
    """``fit_regression`` killed right after its ``completed``-th epoch's backup, then run again
    (the same command): the resumed run's CSV history."""
    real = training.EpochBackup.on_epoch_end

    def die(self, epoch, logs=None):
        real(self, epoch, logs)
        if epoch + 1 == completed:
            raise Killed()

    monkeypatch.setattr(training.EpochBackup, "on_epoch_end", die)
    with pytest.raises(Killed):
        fit_regression(folder, **controls)
    monkeypatch.undo()
    return fit_regression(folder, **controls)


def test_a_backup_holds_the_dropout_states_so_that_a_resumed_epoch_draws_the_same_masks(tmp_path):
    """``EpochBackup`` writes the random-number states the weights leave out (``seed_states``) and
    ``restore_backup`` assigns them: the epoch after a restore has the loss of the uninterrupted
    run's (without them it drew the masks of the first epochs again)."""
    x = np.random.default_rng(0).normal(size=(64, 8)).astype("float32")
    y = np.arange(64) % 3

    def dropout_model():
        keras.utils.set_random_seed(0)
        inputs = keras.Input((8,))
        hidden = keras.layers.Dropout(0.5)(keras.layers.Dense(16)(inputs))
        model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(hidden))
        model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy")
        return model

    model = dropout_model()
    straight = model.fit(x, y, epochs=3, batch_size=16, shuffle=False, verbose=0,
                         callbacks=[training.EpochBackup(tmp_path)]).history["loss"]
    assert len(training.seed_states(model)) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-2.seeds.npz", "epoch-2.weights.h5",
                                                          "epoch-3.seeds.npz", "epoch-3.weights.h5"]
    (tmp_path / "epoch-3.weights.h5").unlink()  # as if killed in the third epoch
    for seeds in (True, False):
        if not seeds:  # a backup without the states (an earlier version's): it loads, the masks differ
            (tmp_path / "epoch-2.seeds.npz").unlink()
        resumed = dropout_model()
        first = training.restore_backup(resumed, tmp_path, "phase1")
        loss = resumed.fit(x, y, epochs=3, initial_epoch=first, batch_size=16, shuffle=False, verbose=0)
        assert first == 2
        if seeds:
            assert loss.history["loss"][0] == pytest.approx(straight[2], rel=1e-6)
        else:
            assert loss.history["loss"][0] != pytest.approx(straight[2], rel=1e-6)


def test_the_train_step_is_traced_once_per_phase(tmp_path, monkeypatch):
    """The optimizer's and the metrics' variables exist before ``fit`` traces the train step
    (``training.build_before_tracing``): on TensorFlow a step that creates them is traced twice.
    From a PyDataset and, on TensorFlow, from a ``tf.data`` pipeline (its element spec)."""
    real = keras.Model.train_step
    calls = []
    monkeypatch.setattr(keras.Model, "train_step", lambda self, *args: calls.append(self.name) or real(self, *args))
    inputs = [Batches(1.0)]
    if backend.is_tensorflow():
        import tensorflow as tf

        batches = Batches(1.0)
        inputs.append(tf.data.Dataset.from_tensor_slices((np.concatenate(batches.x), np.concatenate(batches.y))).batch(8))
    for index, train in enumerate(inputs):
        model = regression(0.05)
        model.compile(keras.optimizers.RMSprop(0.01), "mse", metrics=["mae"])  # RMSprop and MAE have variables
        calls.clear()
        with training.Trainer(tmp_path / str(index)) as trainer:
            trainer.fit(model, "phase1", train, Batches(-1.0), epochs=2, monitor="val_loss")
        assert calls == [model.name], type(train).__name__


def test_schedules_step_by_step(tmp_path):
    batches = list(range(4))  # 4 batches per epoch
    cosine = training.Trainer(tmp_path, lr_schedule="cosine", warmup_epochs=1).learning_rate(0.1, 3, batches)
    values = [float(cosine(step)) for step in (0, 2, 4, 8, 12, 20)]
    # warm-up 0 -> 0.1 over 4 steps, then a cosine from 0.1 to 0 over the other 8
    np.testing.assert_allclose(values, [0.0, 0.05, 0.1, 0.05, 0.0, 0.0], atol=1e-7)
    constant = training.Trainer(tmp_path, lr_schedule="constant", warmup_epochs=1).learning_rate(0.1, 3, batches)
    np.testing.assert_allclose([float(constant(s)) for s in (0, 1, 4, 9, 12)], [0, 0.025, 0.1, 0.1, 0.1], atol=1e-7)
    plain = training.Trainer(tmp_path, lr_schedule="cosine").learning_rate(0.1, 2, batches)
    np.testing.assert_allclose([float(plain(s)) for s in (0, 4, 8)], [0.1, 0.05, 0.0], atol=1e-7)
    assert training.Trainer(tmp_path, lr_schedule="constant").learning_rate(0.1, 3, batches) == 0.1
    assert training.Trainer(tmp_path, lr_schedule="plateau").learning_rate(0.1, 3, batches) == 0.1
    assert float(training.Trainer(tmp_path, lr_schedule="cosine", steps_per_epoch=2).learning_rate(0.1, 2, batches)(2)) \
        == pytest.approx(0.05)


def test_learning_rate_logged_and_cosine_resumed_where_it_stopped(tmp_path, monkeypatch):
    through = fit_regression(tmp_path / "through", epochs=4, lr_schedule="cosine")
    # the logged rate is the schedule's at each epoch's end (4 batches an epoch, 16 in all)
    np.testing.assert_allclose(through["learning_rate"],
                               [0.05 * 0.5 * (1 + np.cos(np.pi * 4 * (e + 1) / 16)) for e in range(4)], atol=1e-7)
    resumed = killed_then_resumed(tmp_path / "killed", monkeypatch, 2, epochs=4, lr_schedule="cosine")
    np.testing.assert_allclose(resumed["learning_rate"], through["learning_rate"], atol=1e-7)


def test_early_stopping_epoch_count_and_resume(tmp_path, monkeypatch):
    # val loss rises from the first epoch on: epoch 1 is the best, patience 2 stops after epoch 3
    history = fit_regression(tmp_path / "through", epochs=8, early_stopping=2)
    assert len(history["val_loss"]) == 3 and np.argmin(history["val_loss"]) == 0
    done = json.loads(rundir.RunDir(tmp_path / "through").done("phase1").read_text())
    assert done["epochs_run"] == 3
    resumed = killed_then_resumed(tmp_path / "killed", monkeypatch, 2, epochs=8, early_stopping=2)
    assert len(resumed["val_loss"]) == 3  # the same stop after the resume, not 2 more epochs


def test_plateau_divides_the_rate_and_resumes(tmp_path, monkeypatch):
    history = fit_regression(tmp_path / "through", epochs=6, lr_schedule="plateau")
    # best at epoch 1; no improvement in epochs 2 and 3 -> x0.2 from epoch 4; again after 5 and 6
    np.testing.assert_allclose(history["learning_rate"], [0.05, 0.05, 0.05, 0.01, 0.01, 0.002], rtol=1e-5)
    resumed = killed_then_resumed(tmp_path / "killed", monkeypatch, 4, epochs=6, lr_schedule="plateau")
    np.testing.assert_allclose(resumed["learning_rate"], history["learning_rate"], rtol=1e-5)


@pytest.mark.usefixtures("stand_in_backbones")  # about the training core, not Xception
def test_balanced_class_weights_reach_fit(tmp_path, monkeypatch):
    weights = training.balanced_class_weights([0, 0, 0, 1, 2, 2], 3)
    assert weights == pytest.approx({0: 6 / 9, 1: 2.0, 2: 1.0})
    seen = {}
    real_fit = keras.Model.fit

    def spy(self, *args, **kwargs):
        seen["class_weight"] = kwargs.get("class_weight")
        return real_fit(self, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "fit", spy)
    out = tmp_path / "run"
    root = tmp_path / "data"
    seed = 0  # a different image each (a hash of the names could repeat one across splits)
    for split, counts in (("train", (6, 2)), ("val", (2, 2))):
        for name, count in zip(("cat", "dog"), counts):
            for i in range(count):
                seed += 1
                write_jpeg(root / split / name / f"{i}.jpg", seed=seed)
    args = ["--data-dir", str(root), "--output-dir", str(out), "--weights", "none", "--image-size", "71",
            "--rnn-timesteps", "71", "--rnn-units", "8", "--batch-size", "4", "--epochs", "1",
            "--fine-tune-epochs", "0", "--skip-image-check", "--class-weight", "balanced"]
    assert crc.main(args) == 0
    assert seen["class_weight"] == pytest.approx({0: 8 / 12, 1: 2.0})


def test_control_flags_are_checked(tmp_path, caplog):
    base = ["--data-dir", str(tmp_path), "--output-dir", str(tmp_path / "o"), "--weights", "none"]
    for extra, words in ((["--warmup-epochs", "1", "--lr-schedule", "plateau"], "--warmup-epochs"),
                         (["--epochs", "2", "--warmup-epochs", "2"], "leaves nothing"),
                         (["--early-stopping", "0"], "--early-stopping")):
        caplog.clear()
        assert crc.main(base + extra) == 1
        assert words in caplog.text
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- lean checkpoints

def optimizer_groups(path):
    """The names of the optimizer variables stored in a ``.keras`` file, at any depth."""
    names = []
    with zipfile.ZipFile(path) as archive, archive.open("model.weights.h5") as handle, h5py.File(handle) as weights:
        weights.visititems(lambda name, item: names.append(name) if "optimizer" in name and
                           isinstance(item, h5py.Dataset) else None)
    return names


def test_best_checkpoint_holds_no_optimizer_state(tmp_path):
    model = regression(0.1)
    model.compile(keras.optimizers.Adam(0.1), "mse")
    model.fit(np.ones((4, 3)), np.ones((4, 1)), verbose=0)
    full = tmp_path / "full.keras"
    model.save(full)
    checkpoint = training.BestCheckpoint(tmp_path / "phase1_best.keras", "val_loss")
    checkpoint.set_model(model)
    checkpoint.on_epoch_end(0, {"val_loss": 1.0})
    assert optimizer_groups(full) and not optimizer_groups(tmp_path / "phase1_best.keras")
    loaded = keras.saving.load_model(tmp_path / "phase1_best.keras")
    for a, b in zip(loaded.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert model.optimizer is not None and model.compiled  # put back after the write
    # a compiled model nested in the saved one (the captioner's decoder during phase 1)
    inputs = keras.Input((3,))
    outer = keras.Model(inputs, model(inputs), name="outer")
    outer.save(tmp_path / "nested_full.keras")
    checkpoint = training.BestCheckpoint(tmp_path / "nested.keras", "val_loss", save=outer)
    checkpoint.set_model(model)
    checkpoint.on_epoch_end(0, {"val_loss": 1.0})
    assert optimizer_groups(tmp_path / "nested_full.keras") and not optimizer_groups(tmp_path / "nested.keras")
    assert (tmp_path / "nested.keras").stat().st_size < (tmp_path / "nested_full.keras").stat().st_size


def test_fine_tune_layers_mean_the_same_with_and_without_pooling():
    """``top_layers`` counts the backbone's own layers: a ``pooling=`` layer on top (the classifier's)
    is not counted, so the classifier and the captioner unfreeze the same blocks for the same N; and
    each call sets every layer, so a later call on the same model unfreezes more or fewer."""
    def built(pooling):
        keras.backend.clear_session()  # the same automatic layer names (conv2d_3) in both builds
        with weights_never_drawn():  # names, not values
            return keras.Sequential([keras.applications.Xception(include_top=False, weights=None,
                                                                 input_shape=(71, 71, 3), pooling=pooling)])

    def trained(model, top_layers):  # each call sets every layer again
        training.set_backbone_trainable(model, "xception", True, top_layers=top_layers)
        return sorted(weight.path for weight in model.get_layer("xception").trainable_weights)

    plain, pooled = built(None), built("avg")
    for top_layers, blocks in ((6, {"block14"}), (16, {"block13", "block14", "conv2d"}), (6, {"block14"})):
        assert trained(plain, top_layers) == trained(pooled, top_layers)
        assert {path.split("_")[0] for path in trained(plain, top_layers)} == blocks
