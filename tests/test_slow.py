"""Opt-in checks on real data (`python -m pytest -q -m slow`): minutes, and ../shared plus
Debian's dataset-fashion-mnist where they exist (skipped otherwise)."""

import json

import pytest

import cnn_rnn_classifier as crc
from helpers import fashion_mnist_tiny_imagenet as fm, restructure_dataset as rd
from tests.conftest import SHARED

XCEPTION = SHARED / "weights" / "xception_imagenet_notop.weights.h5"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not XCEPTION.is_file(), reason="needs ../shared/weights"),
    pytest.mark.skipif(not (fm.DEBIAN_DIR / "train-images-idx3-ubyte.gz").is_file(),
                       reason="needs apt-get install dataset-fashion-mnist"),
]


def test_pretrained_classifier_learns_fashion_mnist(tmp_path):
    """A small demo: 600 real training photos, phase 1 only; well above chance (10%) on the holdout."""
    fm.write_dataset(tmp_path / "raw", train_per_class=80, val_per_class=20, test_images=10)
    rd.restructure(tmp_path / "raw", output=tmp_path / "data", holdout=20)
    assert crc.main(["--data-dir", str(tmp_path / "data"), "--output-dir", str(tmp_path / "run"),
                     "--weights", str(XCEPTION), "--image-size", "71", "--rnn-timesteps", "71",
                     "--rnn-units", "64", "--epochs", "2", "--fine-tune-epochs", "0"]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["num_images"] == 200
    assert metrics["top1"] > 0.6
