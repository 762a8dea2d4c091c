"""benchmarks/gpu_check.py runs end to end on tiny shapes (--smoke) on the CPU, and
prepare_gpu_check.py's float16 weights load back into the model they came from."""

import json
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
    result = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--smoke", "--steps", "1", "--only", "lrcn",
                             "--json", str(tmp_path / "check.json")], cwd=ROOT, capture_output=True, text=True,
                            timeout=600, env={**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "check.json").read_text())
    assert results["backend"] == "jax" and results["matmul_peak"]["bfloat16"] > 0
    rows = results["rows"]
    assert [(row["name"], row["precision"]) for row in rows] == [("LRCN", "float32"), ("LRCN", "bfloat16 mixed")]
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
