"""Backends: checkpoints cross TensorFlow and JAX with the same probabilities, the project imports
and runs without TensorFlow under JAX, and each TensorFlow-only flag is refused in one line there."""

import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import backend
from tests.conftest import BACKEND, make_class_folders

ROOT = Path(__file__).resolve().parents[1]
needs_jax = pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="JAX is not installed")


def run_on(keras_backend, *argv):
    """``python -m tests.backend_roundtrip ...`` on ``keras_backend`` in a fresh process; its JSON line."""
    env = {**os.environ, "KERAS_BACKEND": keras_backend, "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run([sys.executable, "-m", "tests.backend_roundtrip", *map(str, argv)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1]) if argv[0] == "check" else None


@needs_jax
@pytest.mark.tensorflow  # this process is the TensorFlow side
@pytest.mark.heavy
def test_checkpoints_cross_backends_with_the_same_probabilities(tmp_path, capsys):
    """TensorFlow saves (here), JAX loads and saves again (a fresh process, TensorFlow hidden),
    TensorFlow loads (here): both directions."""
    from tests import backend_roundtrip
    from tests.conftest import stand_in_backbones_patched

    with stand_in_backbones_patched():
        backend_roundtrip.save(tmp_path / "from_tensorflow")
    on_jax = run_on("jax", "check", tmp_path / "from_tensorflow", "save", tmp_path / "from_jax")
    capsys.readouterr()
    backend_roundtrip.check(tmp_path / "from_jax")
    on_tensorflow = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for checked, loaded_on in ((on_jax, "jax"), (on_tensorflow, "tensorflow")):
        assert checked["backend"] == loaded_on
        assert set(checked["max_abs_difference"]) == {"classifier", "lrcn", "captioner"}
        assert all(difference <= 1e-4 for difference in checked["max_abs_difference"].values()), checked
        assert checked["tensorflow_imported"] == (loaded_on == "tensorflow")


@pytest.mark.jax_processes
def test_the_scripts_import_without_tensorflow():
    code = ("import sys; from tests.conftest import NoTensorFlow; sys.meta_path.insert(0, NoTensorFlow()); "
            "import cnn_rnn_classifier, lrcn, captioning; from helpers import features, export, distribute, training; "
            "assert 'tensorflow' not in sys.modules; print('ok')")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "KERAS_BACKEND": "jax"})
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_no_tensorflow_in_this_process_unless_it_is_the_backend():
    assert BACKEND == backend.name()
    if BACKEND != "tensorflow":
        assert "tensorflow" not in sys.modules
        assert not backend.has_tensorflow()


@pytest.mark.skipif(BACKEND == "tensorflow", reason="what the other backends refuse")
def test_tensorflow_only_flags_are_refused_in_one_line(tmp_path, caplog):
    import cnn_rnn_classifier as crc

    folder = make_class_folders(tmp_path / "data", per_class=(2, 1, 1))
    common = ["--data-dir", str(folder), "--weights", "none", "--image-size", "71", "--rnn-timesteps", "71",
              "--rnn-units", "8", "--batch-size", "4", "--epochs", "1", "--fine-tune-epochs", "0"]
    for flags, message in ((["--input", "tf.data"], "--input tf.data needs TensorFlow"),
                           # multi-worker trains on JAX too, started with keras.distribution's variables
                           (["--distribute", "multi-worker"], f"--distribute multi-worker on {BACKEND} needs "
                            "KERAS_DISTRIBUTION_JOB_ADDRESSES, KERAS_DISTRIBUTION_NUM_PROCESSES, "
                            "KERAS_DISTRIBUTION_PROCESS_ID. Example")):
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            assert crc.main([*common, "--output-dir", str(tmp_path / "run"), *flags]) == 1
        assert message in caplog.text, caplog.text


def test_help_names_the_tensorflow_only_flags():
    result = subprocess.run([sys.executable, "cnn_rnn_classifier.py", "train", "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    entries = " ".join(result.stdout.split()).split("options:", 1)[1]  # the help entries, not the usage line
    for flag in ("--input {generator,tf.data}", "--distribute {none,mirrored,multi-worker}", "--jit-compile"):
        entry = entries[entries.index(flag):][:250]
        assert "TensorFlow" in entry, (flag, entry)
