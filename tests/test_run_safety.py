"""Runs that survive kills, full disks and clumsy reruns: each fault injected at the exact write."""

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

import cnn_rnn_classifier as crc
from helpers import rundir, training
from helpers.restructure_dataset import restructure
from tests.conftest import Killed, file_times, kill_at_batch, make_class_folders, make_tiny_imagenet, write_jpeg
from tests.conftest import classifier_train_args as train_args

# The runs here are about the training core's files, not about Xception: a stand-in backbone.
pytestmark = pytest.mark.usefixtures("stand_in_backbones")

ROOT = Path(__file__).resolve().parents[1]
SHORT = ["--epochs", "2", "--fine-tune-epochs", "1", "--steps-per-epoch", "2", "--skip-image-check"]


def tiny_model():
    inputs = keras.Input((2,))
    model = keras.Model(inputs, keras.layers.Dense(1)(inputs))
    model.compile("adam", "mse")
    model.fit(np.ones((4, 2)), np.ones((4, 1)), verbose=0)
    return model


def test_kill_during_checkpoint_write_keeps_the_previous_best(tmp_path, monkeypatch):
    model = tiny_model()
    path = tmp_path / "phase1_best.keras"
    checkpoint = training.BestCheckpoint(path, "val_loss")
    checkpoint.set_model(model)
    checkpoint.on_epoch_end(0, {"val_loss": 1.0})
    saved = [w.copy() for w in keras.saving.load_model(path).get_weights()]
    model.set_weights([w + 1 for w in model.get_weights()])

    def save_half_then_die(model, filepath, *args, **kwargs):
        Path(filepath).write_bytes(b"PK\x03\x04 cut short")
        raise Killed()

    monkeypatch.setattr(keras.saving, "save_model", save_half_then_die)
    with pytest.raises(Killed):
        checkpoint.on_epoch_end(1, {"val_loss": 0.5})  # an improvement: the write starts, and dies
    monkeypatch.undo()
    for before, after in zip(saved, keras.saving.load_model(path).get_weights()):  # the old file, whole
        np.testing.assert_array_equal(before, after)
    checkpoint.on_epoch_end(2, {"val_loss": float("nan")})  # not finite: never saved
    checkpoint.on_epoch_end(3, {"val_loss": 2.0})  # worse: not saved
    assert keras.saving.load_model(path).get_weights()[0] == pytest.approx(saved[0])


@pytest.mark.heavy
def test_killed_checkpoint_write_then_the_same_command_finishes(class_folders, tmp_path, monkeypatch):
    out = tmp_path / "run"
    args = train_args(class_folders, out, *SHORT)
    calls = {"n": 0}
    real_save = keras.saving.save_model

    def die_in_second_save(model, filepath, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            Path(filepath).write_bytes(b"PK\x03\x04 cut short")
            raise Killed()
        return real_save(model, filepath, *a, **k)

    monkeypatch.setattr(keras.saving, "save_model", die_in_second_save)
    with pytest.raises(Killed):
        crc.main(args)
    monkeypatch.undo()
    assert crc.main(args) == 0
    for phase in ("phase1", "phase2"):
        training.check_checkpoint(out / f"{phase}_best.keras")
        assert json.loads((out / f"{phase}_done.json").read_text())["epochs"] >= 1
    assert not list(out.glob("*.partial.*")) and not (out / "backup").exists()
    assert json.loads((out / "metrics.json").read_text())["num_images"] == 9


@pytest.mark.heavy
def test_full_disk_is_one_line_and_the_same_command_resumes(class_folders, tmp_path, monkeypatch, caplog):
    out = tmp_path / "run"
    args = train_args(class_folders, out, *SHORT)
    real = keras.Model.save_weights
    calls = {"n": 0}

    def disk_fills_at_second_backup(self, filepath, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            Path(filepath).write_bytes(b"\0" * 10)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, filepath, *a, **k)

    monkeypatch.setattr(keras.Model, "save_weights", disk_fills_at_second_backup)
    assert crc.main(args) == 1
    error = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"][-1]
    assert "No space left on the disk" in error and "needs about" in error and "MB" in error
    assert "run the same command again" in error and "\n" not in error
    assert rundir.read_history(out / "phase1_log.csv")["epoch"] == [0.0, 1.0]
    assert not (out / "phase1_done.json").exists()
    monkeypatch.undo()
    caplog.clear()
    caplog.set_level(logging.INFO)
    assert crc.main(args) == 0
    assert "resuming after 1 completed epochs" in caplog.text
    assert json.loads((out / "phase1_done.json").read_text())["first_epoch"] == 1
    assert rundir.read_history(out / "phase1_log.csv")["epoch"] == [0.0, 1.0]


def test_damaged_backup_is_reported_and_the_one_before_used(class_folders, tmp_path, monkeypatch, caplog):
    out = tmp_path / "run"
    args = train_args(class_folders, out, "--epochs", "3", "--fine-tune-epochs", "0", "--steps-per-epoch", "2",
                      "--skip-image-check")
    kill_at_batch(monkeypatch, 5)  # first batch of epoch 3: epochs 1 and 2 are backed up
    with pytest.raises(Killed):
        crc.main(args)
    monkeypatch.undo()
    backups = sorted((out / "backup" / "phase1").glob("epoch-*.weights.h5"))
    assert [b.name for b in backups] == ["epoch-1.weights.h5", "epoch-2.weights.h5"]
    backups[-1].write_bytes(backups[-1].read_bytes()[:1000])  # the newest cut short
    caplog.set_level(logging.INFO)
    assert crc.main(args) == 0
    assert "the backup" in caplog.text and "epoch-2.weights.h5 is damaged" in caplog.text
    assert json.loads((out / "phase1_done.json").read_text())["first_epoch"] == 1
    assert rundir.read_history(out / "phase1_log.csv")["epoch"] == [0.0, 1.0, 2.0]


def test_csv_row_cut_short_is_skipped(tmp_path):
    log = tmp_path / "phase1_log.csv"
    log.write_text("epoch,accuracy,loss\n0,0.5,1.2\n1,0.6,1.1\n2,0.7")
    assert rundir.read_history(log) == {"epoch": [0.0, 1.0], "accuracy": [0.5, 0.6], "loss": [1.2, 1.1]}


@pytest.mark.xdist_group("trained_classifier")  # one worker trains the shared run
def test_rerun_on_other_data_is_refused_and_changes_nothing(trained_classifier, tmp_path, caplog):
    trained, argv = trained_classifier.run, trained_classifier.argv
    out = shutil.copytree(trained, tmp_path / "run")
    before = file_times(out)
    other = make_class_folders(tmp_path / "other", classes=("ant", "bee", "cat"))
    on_other = argv(out)
    on_other[on_other.index("--data-dir") + 1] = str(other)
    assert crc.main(on_other) == 1
    assert "--data-dir" in caplog.text and "added: ant, bee" in caplog.text and "removed: dog, fox" in caplog.text
    after = file_times(out)
    assert after == before
    caplog.clear()
    caplog.set_level(logging.INFO)
    assert crc.main(argv(out)) == 0
    assert "phase1: skipped, already complete" in caplog.text


def test_second_run_on_the_same_folder_stops_at_once(class_folders, tmp_path, caplog):
    out = tmp_path / "run"
    with rundir.RunDir(out).lock():
        assert crc.main(train_args(class_folders, out, "--epochs", "1", "--fine-tune-epochs", "0")) == 1
    assert f"is in use by another run (process {os.getpid()})" in caplog.text
    assert not (out / "args.json").exists()
    # a lock held by a process that died is free again
    subprocess.run([sys.executable, "-c", f"from helpers import rundir\nwith rundir.RunDir({str(out)!r}).lock(): pass"],
                   cwd=ROOT, check=True)
    with rundir.RunDir(out).lock():
        pass


def test_class_folder_name_not_utf8_is_refused_up_front(class_folders, tmp_path, caplog):
    for split in ("train", "val", "test"):
        bad = os.fsencode(class_folders / split) + b"/caf\xe9"
        os.mkdir(bad)
        write_jpeg(Path(os.fsdecode(bad)) / "x.jpg", 1)
    assert crc.main(train_args(class_folders, tmp_path / "run")) == 1
    assert "must be valid UTF-8" in caplog.text and "caf\\udce9" in caplog.text
    assert not (tmp_path / "run" / "phase1_log.csv").exists()


def test_16_bit_png_is_refused_by_name(class_folders, tmp_path, caplog):
    wide = class_folders / "train" / "cat" / "wide.png"
    Image.fromarray((np.arange(16 * 16).reshape(16, 16) * 200).astype(np.uint16)).save(wide)
    assert Image.open(wide).mode.startswith("I")
    assert crc.main(train_args(class_folders, tmp_path / "run")) == 1
    assert "wide.png" in caplog.text and "16-bit" in caplog.text


@pytest.mark.xdist_group("trained_classifier")  # one worker trains the shared run
def test_a_finished_phase_rerun_with_other_epochs_is_refused_in_one_line_and_changes_nothing(trained_classifier,
                                                                                            tmp_path, caplog):
    out = shutil.copytree(trained_classifier.run, tmp_path / "run")  # phase 1 complete, 1 epoch
    before, saved = file_times(out), (out / rundir.ARGS).read_text()
    argv = trained_classifier.argv(out)
    argv[argv.index("--epochs") + 1] = "3"
    with caplog.at_level(logging.ERROR):
        assert crc.main(argv) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "phase1 is complete and was trained with other flags (--epochs 1 -> 3)" in errors[0]
    assert (out / rundir.ARGS).read_text() == saved and file_times(out) == before


@pytest.mark.xdist_group("trained_classifier")  # one worker trains the shared run
@pytest.mark.heavy
def test_one_line_errors_for_unwritable_paths_and_damaged_models(trained_classifier, tmp_path, caplog):
    class_folders, run, argv = trained_classifier.data, trained_classifier.run, trained_classifier.argv
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert crc.main(argv(a_file)) == 1
    assert f"--output-dir {a_file}: cannot write there" in caplog.text

    model = run / "phase1_best.keras"  # read only
    caplog.clear()
    assert crc.main(["evaluate", "--model", str(model), "--data-dir", str(class_folders),
                     "--json", str(a_file / "eval.json")]) == 1
    assert f"--json {a_file / 'eval.json'} cannot be written: {a_file} is a file, not a folder." in caplog.text

    data = model.read_bytes()
    for name, damaged in (("cut", data[:len(data) // 2]),
                          ("crc", data[:len(data) // 2] + bytes([data[len(data) // 2] ^ 0xFF]) + data[len(data) // 2 + 1:])):
        path = tmp_path / f"{name}.keras"
        path.write_bytes(damaged)
        caplog.clear()
        assert crc.main(["predict", "--model", str(path), str(class_folders / "test" / "cat")]) == 1
        assert f"{path} is damaged" in caplog.text and "does not exist" not in caplog.text
    foreign = subprocess.run([sys.executable, "lrcn.py", "predict", "--model", str(model),
                              str(class_folders / "test" / "cat")], cwd=ROOT, capture_output=True, text=True,
                             env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert foreign.returncode == 1
    assert "is an image classifier (cnn_rnn_classifier.py), not an LRCN (lrcn.py)" in foreign.stderr
    assert "Traceback" not in foreign.stderr


@pytest.mark.filterwarnings("ignore:Skipping nested container")  # Keras, reading the wrong weights file
def test_misleading_inputs_are_named(class_folders, tmp_path, caplog):
    assert crc.main(train_args(class_folders, tmp_path / "r1", "--weights", str(tmp_path))) == 1
    assert "is a folder, not a weights file" in caplog.text
    caplog.clear()
    wrong = tmp_path / "wrong.weights.h5"
    tiny_model().save_weights(wrong)
    assert crc.main(train_args(class_folders, tmp_path / "r2", "--weights", str(wrong))) == 1
    error = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"][-1]
    assert "Could not load Xception no-top weights" in error and len(error) < 1000
    caplog.clear()
    (class_folders / "words.txt").write_bytes(b"cat\tchat \xe9\n")
    assert crc.main(train_args(class_folders, tmp_path / "r3", "--skip-image-check")) == 1
    assert f"{class_folders / 'words.txt'} is not UTF-8 text" in caplog.text
    (class_folders / "words.txt").unlink()
    for flag, value in (("--learning-rate", "0"), ("--fine-tune-learning-rate", "-0.0001")):
        caplog.clear()
        assert crc.main(train_args(class_folders, tmp_path / "r4", flag, value)) == 1
        assert f"{flag} must be a positive number" in caplog.text


def test_byte_order_mark_and_non_utf8_annotations(tmp_path):
    raw = make_tiny_imagenet(tmp_path / "raw")
    (raw / "wnids.txt").write_bytes(b"\xef\xbb\xbf" + (raw / "wnids.txt").read_bytes())
    assert restructure(raw, output=tmp_path / "out").classes == 3
    annotations = raw / "val" / "val_annotations.txt"
    annotations.write_bytes(annotations.read_bytes() + b"caf\xe9\n")
    with pytest.raises(ValueError, match="val_annotations.txt is not UTF-8 text"):
        restructure(raw, output=tmp_path / "out2")


@pytest.mark.tensorflow  # the tf.data input path
def test_tf_data_path_reads_a_file_name_that_is_not_utf8(class_folders):
    from helpers import data

    odd = os.fsencode(class_folders / "train" / "cat") + b"/\xff.jpg"
    write_jpeg(Path(os.fsdecode(odd)), 7)
    split = data.load_splits(class_folders)["train"]
    images, labels = next(iter(crc.tf_data_batches(split, 71, 32, shuffle=False)))
    assert images.shape[0] == len(split) == 19 and int(np.argmax(labels[0])) == 0
