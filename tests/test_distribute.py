import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest

from helpers import distribute

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
    from helpers.training import replica_safe_steps

    batches = lambda *sizes: [(np.zeros((n, 2)), np.zeros(n)) for n in sizes]  # noqa: E731
    assert replica_safe_steps(batches(4, 4, 1), 1, "training") is None  # one replica: all batches
    assert replica_safe_steps(batches(4, 4, 2), 2, "training") is None  # 1 example per replica
    assert replica_safe_steps(batches(4, 4, 1), 2, "training") == 2  # the last would leave one empty
    with pytest.raises(ValueError, match="validation data holds 1 examples, fewer than the 2 replicas"):
        replica_safe_steps(batches(1), 2, "validation")


def run_with_two_cpus(code, timeout=600):
    """Runs ``code`` in a fresh Python with the CPU split into 2 logical devices; returns its last stdout line."""
    prelude = textwrap.dedent("""
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    """)
    result = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], cwd=ROOT, capture_output=True,
                            text=True, timeout=timeout, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]


def test_mirrored_matches_single_device():
    """3 SGD steps of the tiny classifier, global batch 4: MirroredStrategy over 2 logical
    CPUs (2 per replica) against one device, same initial weights and data."""
    out = run_with_two_cpus("""
        import json, keras, numpy as np
        import cnn_rnn_classifier as crc
        from helpers import distribute, training

        rng = np.random.default_rng(0)
        x = rng.uniform(-1, 1, (12, 71, 71, 3)).astype("float32")
        y = np.eye(3, dtype="float32")[rng.integers(0, 3, 12)]

        def run(strategy, weights=None):
            with distribute.scope(strategy):
                keras.utils.set_random_seed(1)
                model = crc.build_cnn_rnn_classifier(3, 71, 71, 8, weights=None)
                if weights is not None:
                    model.set_weights(weights)
                start = model.get_weights()
                training.set_backbone_trainable(model, "xception", False)
                crc._compile(model, keras.optimizers.SGD(0.5))
                history = model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
            return start, history.history["loss"][0], model.get_weights()

        start, single_loss, single = run(None)
        strategy = distribute.make_strategy("mirrored", ["/cpu:0", "cpu:1"])
        _, mirrored_loss, mirrored = run(strategy, start)
        moved = max(float(np.abs(a - b).max()) for a, b in zip(single, start))
        difference = max(float(np.abs(a - b).max()) for a, b in zip(single, mirrored))
        print(json.dumps({"replicas": strategy.num_replicas_in_sync, "single_loss": single_loss,
                          "mirrored_loss": mirrored_loss, "moved": moved, "difference": difference}))
    """)
    result = json.loads(out)
    assert result["replicas"] == 2
    assert result["moved"] > 1e-3  # training changed the weights ...
    assert result["difference"] < 1e-5  # ... the same way on 2 replicas as on one
    assert result["mirrored_loss"] == pytest.approx(result["single_loss"], rel=1e-5)


def test_mirrored_training_from_the_command_line(tmp_path):
    from tests.conftest import make_class_folders

    data = make_class_folders(tmp_path / "data")
    out = tmp_path / "run"
    flags = ["--data-dir", str(data), "--output-dir", str(out), "--weights", "none", "--image-size", "71",
             "--rnn-timesteps", "71", "--rnn-units", "8", "--epochs", "1", "--fine-tune-epochs", "0",
             "--distribute", "mirrored", "--devices", "/cpu:0", "/cpu:1", "--mixed-precision", "off"]
    code = f"""
        import cnn_rnn_classifier as crc
        flags = {flags!r}
        assert crc.main(flags + ["--batch-size", "3", "--fine-tune-batch-size", "4"]) == 1  # 3 not divisible
        print(crc.main(flags + ["--batch-size", "4", "--fine-tune-batch-size", "4"]))
    """
    assert run_with_two_cpus(code) == "0"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_images"] == 9 and (out / "phase1_best.keras").is_file()
    assert (out / "phase1_done.json").is_file() and len((out / "phase1_log.csv").read_text().splitlines()) == 2
