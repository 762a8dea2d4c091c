"""``--distribute multi-worker`` on JAX: several processes on the loopback (gloo collectives on the
CPU), started as the docs say, without TensorFlow (``tests.stand_in`` hides it under JAX)."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import distribute
from helpers.errors import UsageError
from tests.conftest import make_class_folders, make_flickr8k
from tests.test_distribute import free_ports, kill_once_reached

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["--weights", "none", "--image-size", "71", "--rnn-timesteps", "71", "--rnn-units", "8", "--epochs", "3",
         "--fine-tune-epochs", "0", "--batch-size", "6", "--fine-tune-batch-size", "6", "--workers", "1",
         "--mixed-precision", "off", "--distribute", "multi-worker", "--skip-image-check"]


CAPTIONER_FLAGS = ["--weights", "none", "--image-size", "71", "--embedding-dim", "16", "--lstm-units", "16",
                   "--min-word-count", "1", "--max-length", "6", "--epochs", "1", "--fine-tune-epochs", "0",
                   "--workers", "1", "--mixed-precision", "off", "--distribute", "multi-worker", "--skip-image-check",
                   "--beam-size", "1"]


def start(count, data, out, *extra, port=None, script="cnn_rnn_classifier.py", flags=FLAGS):
    """``count`` processes of ``script`` (stand-in backbones), the same command in each, process 0
    the coordinator on a free loopback port."""
    port = port or free_ports(1)[0]
    processes = []
    for index in range(count):
        env = dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="2",
                   KERAS_DISTRIBUTION_JOB_ADDRESSES=f"127.0.0.1:{port}",
                   KERAS_DISTRIBUTION_NUM_PROCESSES=str(count), KERAS_DISTRIBUTION_PROCESS_ID=str(index))
        command = [sys.executable, "-m", "tests.stand_in", script, "--data-dir", str(data),
                   "--output-dir", str(out), *flags, *extra]
        processes.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
    return processes


def finish(processes, timeout=300):
    logs = [p.communicate(timeout=timeout)[0] for p in processes]
    return [p.returncode for p in processes], logs


def log_rows(path):
    with open(path, newline="") as file:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(file)]


@pytest.mark.jax_processes
@pytest.mark.heavy
def test_two_processes_train_as_one_resume_after_a_kill_and_only_the_chief_writes(tmp_path):
    """Two loopback processes, each feeding half of every global batch of 6: a kill of process 1
    in the third epoch ends process 0 in one line (no hang); the same commands again resume from
    the last complete epoch, and the run then has every epoch's losses and the best weights of one
    process with the same global batch, uninterrupted. Only process 0 writes the run; another
    model on its folder is refused by every process."""
    import keras

    import cnn_rnn_classifier  # noqa: F401  (its layers, to load the checkpoints)

    data = make_class_folders(tmp_path / "data")  # 18 train images: 3 global batches; 9 val: 1
    (one,) = start(1, data, tmp_path / "one")
    codes, logs = finish([one])
    assert codes == [0], logs[0][-3000:]

    out = tmp_path / "two"
    chief, other = start(2, data, out)
    seen, rest = kill_once_reached(chief, other, "Epoch 3/3", timeout=200)
    errors = [line for line in rest.splitlines() if " ERROR " in line]
    assert chief.returncode == 1 and len(errors) == 1, seen[-2000:] + rest[-3000:]
    assert "another worker of the cluster failed" in errors[0]
    assert not (out / "phase1_done.json").exists()

    codes, logs = finish(start(2, data, out))
    assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert "phase1: resuming after 2 completed epochs" in logs[0]
    single, double = log_rows(tmp_path / "one" / "phase1_log.csv"), log_rows(out / "phase1_log.csv")
    assert [row["epoch"] for row in double] == [row["epoch"] for row in single] == [0, 1, 2]
    for a, b in zip(single, double):  # every epoch's losses, the resumed third's too
        for key in ("loss", "val_loss", "accuracy", "val_accuracy"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    weights = [keras.saving.load_model(folder / "phase1_best.keras").get_weights()
               for folder in (tmp_path / "one", out)]
    for a, b in zip(*weights):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert (out / "metrics.json").is_file()
    assert not distribute.process_folder(out, 1).exists()  # process 1's own folder, removed at the end

    # the same folder with another model: refused by every process, in one line each
    codes, logs = finish(start(2, data, out, "--rnn-units", "16"))
    assert codes == [1, 1], logs
    for log in logs:
        errors = [line for line in log.splitlines() if " ERROR " in line]
        assert len(errors) == 1 and "holds a run with another model or other data (--rnn-units 8 -> 16" in errors[0]


@pytest.mark.slow  # three processes at once, about a minute of CPU: opt-in (the default suite's time)
@pytest.mark.jax_processes
@pytest.mark.heavy
def test_two_captioner_processes_train_as_one(tmp_path):
    """The captioner on two loopback processes: each encodes half of the images for phase 1's
    features (gathered on both), feeds its half of every global batch of bucketed captions (8
    captions) and the losses equal one process's with the same global batches; the chief alone
    writes and evaluates. (Phase 2's image batches and the attention decoder's grid batches split
    the same way, by ``CaptionBatches.load_part``: ``test_captioning``'s parts test.)"""
    data = make_flickr8k(tmp_path / "data", counts=(12, 4, 3))
    flags = [*CAPTIONER_FLAGS, "--batch-size", "8", "--fine-tune-batch-size", "4"]
    runs = {count: tmp_path / f"processes{count}" for count in (1, 2)}
    started = {count: start(count, data, out, script="captioning.py", flags=flags) for count, out in runs.items()}
    for count, processes in started.items():  # both runs at once, each on its own port
        codes, logs = finish(processes)
        assert codes == [0] * count, "".join(log[-3000:] for log in logs)
    assert "process 1 of 2 computes rows [6, 12) of 12" in logs[1]  # the train images' grids: its half
    assert "process 0 of 2 computes rows [0, 6) of 12" in logs[0]
    assert "split: test" in logs[0] and "split: test" not in logs[1]  # the chief evaluates
    single, double = (log_rows(out / "phase1_log.csv") for out in runs.values())
    assert len(single) == len(double) == 1
    for key in ("loss", "val_loss", "accuracy", "val_accuracy"):
        assert single[0][key] == pytest.approx(double[0][key], rel=1e-5, abs=1e-6), key
    assert (runs[2] / "metrics.json").is_file() and (runs[2] / "vocabulary.json").is_file()
    assert not distribute.process_folder(runs[2], 1).exists()


@pytest.mark.backend_independent
def test_process_variables_are_checked_in_one_line():
    good = {"KERAS_DISTRIBUTION_JOB_ADDRESSES": "10.0.0.1:1234,10.0.0.2:1234",
            "KERAS_DISTRIBUTION_NUM_PROCESSES": "2", "KERAS_DISTRIBUTION_PROCESS_ID": "1"}
    assert distribute.read_process_variables(good) == ("10.0.0.1:1234", 2, 1)
    assert distribute.read_process_variables({**good, "KERAS_DISTRIBUTION_JOB_ADDRESSES": "h:1"}) == ("h:1", 2, 1)
    for change, message in (({"KERAS_DISTRIBUTION_PROCESS_ID": ""}, "needs KERAS_DISTRIBUTION_PROCESS_ID"),
                            ({"KERAS_DISTRIBUTION_NUM_PROCESSES": "two"}, "must be integers"),
                            ({"KERAS_DISTRIBUTION_PROCESS_ID": "2"}, "process 2 of 2"),
                            ({"KERAS_DISTRIBUTION_NUM_PROCESSES": "3"}, "with 2 address")):
        with pytest.raises(UsageError, match=message) as caught:
            distribute.read_process_variables({**good, **change})
        assert "\n" not in str(caught.value) and "KERAS_DISTRIBUTION_JOB_ADDRESSES=10.0.0.1:1234" in str(caught.value)
