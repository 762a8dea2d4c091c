"""Shared fixtures: tiny trees of real JPEG files written in tmp_path."""

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def write_jpeg(path, seed, size=16, mode="RGB"):
    """Writes a real JPEG: smooth colour gradients plus noise, in RGB, L (grayscale) or CMYK."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, size)
    base = np.stack([np.outer(ramp, ramp), np.outer(ramp, 1 - ramp), np.outer(1 - ramp, ramp)], axis=-1)
    pixels = np.clip(255 * base * rng.uniform(0.5, 1.0, 3) + rng.normal(0, 20, base.shape), 0, 255)
    image = Image.fromarray(pixels.astype(np.uint8), "RGB")
    if mode != "RGB":
        image = image.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="JPEG", quality=90)
    return path


def make_tiny_imagenet(root, wnids=("n001", "n002", "n003"), train_per_class=6, val_per_class=2, test=3):
    """A raw Tiny ImageNet download in miniature, with grayscale and CMYK images and stray files."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "wnids.txt").write_text("".join(f"{w}\n" for w in wnids))
    (root / "words.txt").write_text("".join(f"{w}\tthing {i}\n" for i, w in enumerate(wnids)))
    seed = 0
    for w in wnids:
        for i in range(train_per_class):
            mode = ("RGB", "L", "CMYK")[i % 3]
            write_jpeg(root / "train" / w / "images" / f"{w}_{i}.JPEG", seed, mode=mode)
            seed += 1
        (root / "train" / w / f"{w}_boxes.txt").write_text("".join(f"{w}_{i}.JPEG\t0\t0\t9\t9\n" for i in range(train_per_class)))
    rows = []
    for i in range(val_per_class * len(wnids)):
        write_jpeg(root / "val" / "images" / f"val_{i}.JPEG", seed)
        seed += 1
        rows.append(f"val_{i}.JPEG\t{wnids[i % len(wnids)]}\t0\t0\t9\t9\n")
    (root / "val" / "val_annotations.txt").write_text("".join(rows))
    for i in range(test):
        write_jpeg(root / "test" / "images" / f"test_{i}.JPEG", seed)
        seed += 1
    (root / "train" / ".DS_Store").write_bytes(b"\0")
    (root / "val" / "images" / "Thumbs.db").write_bytes(b"\0")
    return root


def make_class_folders(root, classes=("cat", "dog", "fox"), per_class=(6, 3, 3), size=16):
    """train/ val/ test/ class folders of real JPEGs; every third image grayscale or CMYK."""
    root = Path(root)
    seed = 100
    for split, count in zip(("train", "val", "test"), per_class):
        for c_index, name in enumerate(classes):
            for i in range(count):
                mode = ("RGB", "L", "CMYK")[(i + c_index) % 3]
                write_jpeg(root / split / name / f"{name}_{i}.jpg", seed, size=size, mode=mode)
                seed += 1
    return root


class Killed(BaseException):
    """Stands for the process being killed: not an Exception, so nothing catches it."""


def kill_at_batch(monkeypatch, batch_number):
    """Makes training raise ``Killed`` at the end of its ``batch_number``-th batch (1-based, over all epochs)."""
    import keras

    batches = {"n": 0}

    def on_train_batch_end(self, batch, logs=None):
        batches["n"] += 1
        if batches["n"] == batch_number:
            raise Killed()

    monkeypatch.setattr(keras.callbacks.CSVLogger, "on_train_batch_end", on_train_batch_end, raising=False)


@pytest.fixture
def tiny_imagenet(tmp_path):
    return make_tiny_imagenet(tmp_path / "raw")


@pytest.fixture
def class_folders(tmp_path):
    return make_class_folders(tmp_path / "data")
