import json
import re
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest

from helpers import distribute
from tests.conftest import make_clips

pytestmark = pytest.mark.tensorflow  # tf.distribute

ROOT = Path(__file__).resolve().parents[1]


def test_flag_errors():
    assert distribute.make_strategy("none") is None
    with pytest.raises(ValueError, match="--distribute must be one of"):
        distribute.make_strategy("parameter-server")
    with pytest.raises(ValueError, match="--devices needs --distribute mirrored"):
        distribute.make_strategy("none", ["/gpu:0"])
    with pytest.raises(ValueError, match=r"--devices /gpu:7: no such device; visible: .*CPU:0"):
        distribute.make_strategy("mirrored", ["/gpu:7"])
    two = types.SimpleNamespace(num_replicas_in_sync=2)
    distribute.check_global_batch(two, batch_size=32, fine_tune_batch_size=16)
    with pytest.raises(ValueError, match=r"--fine-tune-batch-size 5 is the global batch .* 2 replicas \(e.g. 4\)"):
        distribute.check_global_batch(two, batch_size=32, fine_tune_batch_size=5)


def test_partial_last_batch_never_leaves_a_replica_empty():
    import keras

    from helpers.distribute import replica_safe

    class Batches(keras.utils.PyDataset):
        def __init__(self, *sizes):
            super().__init__()
            self.sizes, self.epochs = sizes, 0

        def __len__(self):
            return len(self.sizes)

        def __getitem__(self, index):
            return np.zeros((self.sizes[index], 2)), np.zeros(self.sizes[index])

        def on_epoch_end(self):
            self.epochs += 1

    data = Batches(4, 4, 1)
    assert replica_safe(data, 1, "training") is data  # one replica: all batches
    assert replica_safe(Batches(4, 4, 2), 2, "training").sizes == (4, 4, 2)  # one example per replica
    safe = replica_safe(data, 2, "training")  # the last would leave a replica empty
    assert len(safe) == 2 and [len(safe[i][0]) for i in range(2)] == [4, 4]
    safe.on_epoch_end()
    assert data.epochs == 1  # the wrapped data still reshuffles
    with pytest.raises(ValueError, match="validation data holds 1 examples, fewer than the 2 replicas"):
        replica_safe(Batches(1), 2, "validation")


def run_with_two_cpus(code, timeout=600):
    """Runs ``code`` in a fresh Python with the CPU split into 2 logical devices and the stand-in
    backbones (``tests.stand_in``); returns its last stdout line."""
    prelude = textwrap.dedent("""
        import tests.stand_in
        tests.stand_in.install()  # the strategy is under test, not Xception
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    """)
    result = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], cwd=ROOT, capture_output=True,
                            text=True, timeout=timeout, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]


@pytest.mark.heavy
def test_mirrored_matches_single_device_and_the_command_line_resumes(tmp_path):
    """Under 2 logical CPUs, in one fresh process: (1) 3 SGD steps of the tiny classifier, global
    batch 4: MirroredStrategy (2 per replica) against one device, same initial weights and data;
    (2) the CLI: a batch size not divisible by 2 is refused, and a run killed in epoch 2 resumes
    from BackupAndRestore's epoch under MirroredStrategy."""
    from tests.conftest import make_class_folders

    data = make_class_folders(tmp_path / "data")
    out = tmp_path / "run"
    flags = ["--data-dir", str(data), "--output-dir", str(out), "--weights", "none", "--image-size", "71",
             "--rnn-timesteps", "71", "--rnn-units", "8", "--epochs", "3", "--fine-tune-epochs", "0",
             "--steps-per-epoch", "2", "--distribute", "mirrored", "--devices", "/cpu:0", "/cpu:1",
             "--mixed-precision", "off", "--batch-size", "4"]
    printed = run_with_two_cpus(f"""
        import json, keras, numpy as np, pytest
        import cnn_rnn_classifier as crc
        from helpers import distribute, training
        from tests.conftest import Killed, kill_at_batch

        rng = np.random.default_rng(0)
        x = rng.uniform(-1, 1, (12, 71, 71, 3)).astype("float32")
        y = np.eye(3, dtype="float32")[rng.integers(0, 3, 12)]

        def run(strategy, weights=None):
            with distribute.scope(strategy):
                keras.utils.set_random_seed(1)
                model = crc.build_cnn_rnn_classifier(num_classes=3, image_size=71, rnn_timesteps=71, rnn_units=8,
                                                     weights=None)
                if weights is not None:
                    model.set_weights(weights)
                start = model.get_weights()
                training.set_backbone_trainable(model, "xception", False)
                crc.compile_classifier(model, keras.optimizers.SGD(0.5))
                history = model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
            return start, history.history["loss"][0], model.get_weights()

        start, single_loss, single = run(None)
        strategy = distribute.make_strategy("mirrored", ["/cpu:0", "cpu:1"])
        _, mirrored_loss, mirrored = run(strategy, start)
        moved = max(float(np.abs(a - b).max()) for a, b in zip(single, start))
        difference = max(float(np.abs(a - b).max()) for a, b in zip(single, mirrored))

        flags = {flags!r}
        refused = crc.main(flags + ["--fine-tune-batch-size", "3"])  # 3 is not divisible by 2 replicas
        patch = pytest.MonkeyPatch()
        kill_at_batch(patch, 3)  # first batch of epoch 2, after epoch 1 was backed up
        try:
            crc.main(flags)
        except Killed:
            pass
        patch.undo()
        print(json.dumps({{"replicas": strategy.num_replicas_in_sync, "single_loss": single_loss,
                          "mirrored_loss": mirrored_loss, "moved": moved, "difference": difference,
                          "refused": refused, "rerun": crc.main(flags)}}))
    """)
    result = json.loads(printed)
    assert result["replicas"] == 2
    assert result["moved"] > 1e-3  # training changed the weights ...
    assert result["difference"] < 1e-5  # ... the same way on 2 replicas as on one
    assert result["mirrored_loss"] == pytest.approx(result["single_loss"], rel=1e-5)

    assert result["refused"] == 1 and result["rerun"] == 0
    done = json.loads((out / "phase1_done.json").read_text())
    assert done["first_epoch"] == 1 and done["epochs_run"] == 2  # resumed, not restarted
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_images"] == 9 and len((out / "phase1_log.csv").read_text().splitlines()) >= 4
    assert not list((out / "features").glob("*.npy"))  # the phase-1 feature cache is off under --distribute


# ---------------------------------------------------------------- multi-worker

def test_tf_config_errors(monkeypatch):
    from helpers import multiworker

    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match="needs the TF_CONFIG environment variable.*Example"):
        multiworker.read_tf_config()
    with pytest.raises(ValueError, match="not valid JSON"):
        multiworker.read_tf_config("{cluster: ")
    with pytest.raises(ValueError, match="'worker' list"):
        multiworker.read_tf_config('{"cluster": {}, "task": {"type": "worker", "index": 0}}')
    with pytest.raises(ValueError, match="host:port"):
        multiworker.read_tf_config('{"cluster": {"worker": ["localhost"]}, "task": {"type": "worker", "index": 0}}')
    with pytest.raises(ValueError, match="task must name this process"):
        multiworker.read_tf_config('{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 2}}')
    config = multiworker.read_tf_config('{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 1}}')
    assert not multiworker.is_chief(config)
    assert multiworker.is_chief({"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 0}})
    assert not multiworker.is_chief({"cluster": {"chief": ["c:1"], "worker": ["a:1"]},
                                     "task": {"type": "worker", "index": 0}})
    train, val = multiworker.ShardedInput.train_and_val(None, 4, 18, 9, "images")
    assert (train.steps, val.steps) == (4, 2)
    _, val = multiworker.ShardedInput.train_and_val(None, 4, 18, 3, "images")
    with pytest.raises(ValueError, match="val/ holds 3 images, fewer than the global batch 4"):
        val.steps


def free_ports(count):
    import socket

    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def kill_once_reached(chief, other, marker, timeout):
    """Reads ``chief``'s output until a line holds ``marker``, kills ``other``, then waits for
    ``chief`` to end (the test fails if it hangs): ``(output before the kill, output after)``."""
    seen = []
    for line in chief.stdout:
        seen.append(line)
        if marker in line:
            break
    other.kill()
    other.wait()
    try:
        rest = chief.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        chief.kill()
        pytest.fail(f"the chief hung after the other process was killed ({marker!r} seen)")
    return "".join(seen), rest


def start_workers(script, flags, outputs, ports=None):
    """Starts one ``script`` process per output folder (stand-in backbones: the cluster is under
    test, not Xception or VGG16), a 127.0.0.1 cluster in TF_CONFIG; ``flags`` are the script's own,
    the same on every worker."""
    ports = ports or free_ports(len(outputs))
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    processes = []
    for index, out in enumerate(outputs):
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
                   TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}))
        command = [sys.executable, "-m", "tests.stand_in", script, "--output-dir", str(out), *flags,
                   "--mixed-precision", "off", "--distribute", "multi-worker", "--skip-image-check", "--verbose"]
        processes.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
    return processes, ports


@pytest.mark.heavy
def test_killed_worker_stops_the_other_and_a_rerun_resumes_identically_writing_only_on_the_chief(tmp_path):
    """Two loopback workers of the classifier: one killed in epoch 3 stops the other (no hang);
    the same command then resumes on both, which train identically (the same weights fingerprint
    after every epoch), and only the chief writes the run."""
    from tests.conftest import make_class_folders

    data = make_class_folders(tmp_path / "data")
    outputs = [tmp_path / "chief_out", tmp_path / "worker_out"]
    flags = ["--data-dir", str(data), "--weights", "none", "--image-size", "71", "--rnn-timesteps", "71",
             "--rnn-units", "8", "--input", "tf.data", "--workers", "1", "--epochs", "5", "--fine-tune-epochs", "0",
             "--batch-size", "4"]
    (chief, worker), ports = start_workers("cnn_rnn_classifier.py", flags, outputs)
    seen, rest = kill_once_reached(chief, worker, "Epoch 3/5", timeout=300)  # epochs 1-2 backed up
    assert chief.returncode == 1, seen[-2000:] + rest[-3000:]
    assert "another worker of the cluster failed" in rest
    assert not (outputs[0] / "phase1_done.json").exists()

    processes, _ = start_workers("cnn_rnn_classifier.py", flags, outputs, ports)  # the same command on every worker
    logs = [p.communicate(timeout=420)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert re.search(r"phase1: resuming after [1-9]\d* completed epochs", logs[0])
    fingerprints = [re.findall(r"phase1: weights fingerprint (\S+)", log) for log in logs]
    assert fingerprints[0] and fingerprints[0] == fingerprints[1]
    chief_out = outputs[0]
    assert (chief_out / "phase1_best.keras").is_file() and (chief_out / "metrics.json").is_file()
    rows = (chief_out / "phase1_log.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,accuracy,learning_rate,loss")  # the rate logged here too
    assert sorted({int(row.split(",")[0]) for row in rows[1:]}) == list(range(5))
    assert not outputs[1].exists()  # the other worker wrote only to its own temporary folder, now removed


@pytest.mark.heavy
def test_lrcn_on_two_loopback_workers(tmp_path):
    data = tmp_path / "data"
    for split, lengths in (("train", (3, 5, 4, 6)), ("val", (4, 2)), ("test", (5, 3))):
        make_clips(data / split, lengths=lengths)
    outputs = [tmp_path / "chief_out", tmp_path / "worker_out"]
    processes, _ = start_workers("lrcn.py", ["--data-dir", str(data), "--frames", "3", "--weights", "none",
                                             "--image-size", "32", "--dense-units", "8", "--gru-units", "4",
                                             "--epochs", "1", "--fine-tune-epochs", "1", "--batch-size", "2",
                                             "--fine-tune-batch-size", "2"], outputs)
    logs = [p.communicate(timeout=420)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    for phase in ("phase1", "phase2"):
        fingerprints = [re.findall(rf"{phase}: weights fingerprint (\S+)", log) for log in logs]
        assert fingerprints[0] and fingerprints[0] == fingerprints[1]
    assert (outputs[0] / "metrics.json").is_file() and not outputs[1].exists()


def test_multi_worker_flag_errors(tmp_path, monkeypatch, caplog):
    import cnn_rnn_classifier as crc
    import lrcn
    from tests.conftest import make_class_folders

    monkeypatch.delenv("TF_CONFIG", raising=False)
    data = make_class_folders(tmp_path / "data")
    flags = ["--data-dir", str(data), "--output-dir", str(tmp_path / "run"), "--weights", "none",
             "--distribute", "multi-worker"]
    assert crc.main(flags) == 1
    assert "needs --input tf.data: the generator cannot be sharded" in caplog.text
    assert crc.main(flags + ["--input", "tf.data"]) == 1
    assert "needs the TF_CONFIG environment variable" in caplog.text
    assert lrcn.main(flags + ["--variable-length"]) == 1
    assert "needs --frames N and one label per sequence" in caplog.text
    assert not (tmp_path / "run").exists()


DATA_PARALLEL = """
import json, sys
import numpy as np
import keras
from helpers import distribute

assert keras.backend.backend() == "jax" and len(keras.distribution.list_devices("cpu")) == 2


def fit(strategy):
    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).normal(size=(32, 6)).astype("float32")
    y = keras.utils.to_categorical(np.arange(32) % 3, 3)
    with distribute.scope(strategy):
        model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4, activation="relu"),
                                  keras.layers.Dense(3, activation="softmax")])
        model.compile(keras.optimizers.SGD(0.1), "categorical_crossentropy")
        history = model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    return history.history["loss"], [w.tolist() for w in model.get_weights()]


strategy = distribute.make_strategy("mirrored")
single, parallel = fit(None), fit(strategy)
json.dump({"replicas": strategy.num_replicas_in_sync, "single": single, "parallel": parallel,
           "data_sharded": str(strategy.distribution.get_data_layout((8, 6)).axes)}, open(sys.argv[1], "w"))
"""


@pytest.mark.jax_processes
@pytest.mark.heavy
def test_mirrored_on_jax_is_keras_data_parallel_with_the_single_device_result(tmp_path):
    """--distribute mirrored on JAX: keras.distribution.DataParallel over two (forced) CPU devices
    gives the single-device losses and weights for the same global batch."""
    script = tmp_path / "data_parallel.py"
    script.write_text(DATA_PARALLEL)
    env = dict(os.environ, KERAS_BACKEND="jax", XLA_FLAGS="--xla_force_host_platform_device_count=2",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    result = subprocess.run([sys.executable, str(script), str(tmp_path / "out.json")], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["replicas"] == 2 and "batch" in out["data_sharded"]
    np.testing.assert_allclose(out["parallel"][0], out["single"][0], rtol=1e-5)
    for a, b in zip(out["parallel"][1], out["single"][1]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
