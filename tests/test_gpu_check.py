"""benchmarks/gpu_check.py runs end to end on tiny shapes (--smoke) on the CPU, and
prepare_gpu_check.py's float16 weights load back into the model they came from."""

import json
import re
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


@pytest.mark.jax_processes
@pytest.mark.heavy
def test_smoke_run_prints_the_table(tmp_path):
    command = ["benchmarks/gpu_check.py", "--smoke", "--steps", "1", "--only", "lrcn", "--precision", "bfloat16",
               "--json", str(tmp_path / "check.json")]  # one fresh process: the float32 row runs the same code
    result = subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "check.json").read_text())
    assert results["backend"] == "jax" and results["matmul_peak"]["bfloat16"] > 0
    rows = results["rows"]
    assert [(row["name"], row["precision"]) for row in rows] == [("LRCN", "bfloat16 mixed")]  # one of --precision both
    for row in rows:
        assert "error" not in row, row
        assert row["per_second"] > 0 and row["flops_per_step"] > 1e6 and 0 < row["mfu"] < 1
    assert "| LRCN | 2 | bfloat16 mixed |" in result.stdout


def test_float16_weights_load_back(tmp_path):
    import gpu_check
    import prepare_gpu_check

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4), keras.layers.Dense(2)])
    model.save_weights(tmp_path / "full.weights.h5")
    prepare_gpu_check.half_weights(tmp_path / "full.weights.h5", tmp_path / "half.weights.h5")
    assert (tmp_path / "half.weights.h5").stat().st_size < (tmp_path / "full.weights.h5").stat().st_size * 1.1
    gpu_check.full_weights(tmp_path / "half.weights.h5", tmp_path / "back.weights.h5")
    copy = keras.models.clone_model(model)
    copy.load_weights(tmp_path / "back.weights.h5")
    for original, loaded in zip(model.get_weights(), copy.get_weights()):
        np.testing.assert_allclose(loaded, original, rtol=1e-3, atol=1e-4)


@pytest.mark.backend_independent
def test_prepare_judges_every_argument_first_and_deletes_nothing_it_did_not_write(tmp_path, capsys):
    import prepare_gpu_check

    from tests.conftest import make_tiny_imagenet

    source = make_tiny_imagenet(tmp_path / "tiny")
    weights = tmp_path / "w.weights.h5"
    weights.write_bytes(b"not read before the checks pass")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "precious.txt").write_text("keep me")
    base = ["--tiny-imagenet", str(source), "--weights", str(weights), "--classes", "2"]
    cases = [
        (["--output", str(theirs), *base], "is a folder this script did not write"),
        (["--output", str(theirs), "--tiny-imagenet", "/nonexistent", "--weights", str(weights)],
         "is not a raw Tiny ImageNet download"),
        (["--output", str(tmp_path / "new"), *base, "--classes", "0"], r"--classes must be in \[1, 3\]"),
        (["--output", str(tmp_path / "new"), *base, "--classes", "-2"], r"Received: -2"),
        (["--output", str(tmp_path / "new"), *base, "--classes", "500"], r"Received: 500"),
        (["--output", str(tmp_path / "new"), *base, "--weights", str(tmp_path / "no.h5")],
         "no.h5 does not exist"),
        (["--output", str(theirs / "precious.txt"), *base], "is a file, not a folder"),
    ]
    for argv, message in cases:
        assert prepare_gpu_check.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and re.search(message, err), (argv, err)
    assert [p.name for p in theirs.iterdir()] == ["precious.txt"] and not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["theirs", "tiny", "w.weights.h5"]  # no half-written folder


@pytest.mark.backend_independent
def test_gpu_check_judges_its_output_before_measuring(tmp_path):
    for argv, message in ((["--json", f"{tmp_path}/results/"], "names a folder; give a file name"),
                          (["--json", str(tmp_path / "a_file" / "x.json")], "is a file, not a folder"),
                          (["--carried", str(tmp_path)], "holds no tiny-imagenet-subset/")):
        (tmp_path / "a_file").write_text("")
        result = subprocess.run([sys.executable, "benchmarks/gpu_check.py", *argv], cwd=ROOT, capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 2 and message in result.stderr, (argv, result.stderr)
        assert "Traceback" not in result.stderr
