"""The demo dataset writers, on small synthetic arrays standing in for Fashion-MNIST."""

import numpy as np
import pytest

from helpers import data, fashion_mnist_tiny_imagenet as fm, moving_fashion_mnist as mm, restructure_dataset as rd, sequences


@pytest.fixture
def fake_fashion_mnist(monkeypatch):
    rng = np.random.default_rng(0)
    arrays = ((rng.integers(1, 256, (200, 28, 28), dtype=np.uint8), np.arange(200) % 10),
              (rng.integers(1, 256, (100, 28, 28), dtype=np.uint8), np.arange(100) % 10))
    monkeypatch.setattr(fm, "load_fashion_mnist", lambda *_: arrays)
    monkeypatch.setattr(mm, "load_fashion_mnist", lambda *_: arrays)


def test_tiny_imagenet_layout_restructures_and_loads(fake_fashion_mnist, tmp_path):
    counts = fm.write_dataset(tmp_path / "raw", train_per_class=6, val_per_class=2, test_images=5)
    assert counts == {"train": 60, "val": 20, "test_unlabelled": 5}
    summary = rd.restructure(tmp_path / "raw", output=tmp_path / "data", holdout=2)
    assert summary.images == {"train": 40, "val": 20, "test": 20, "test_unlabelled": 5}
    splits = data.load_splits(tmp_path / "data")
    assert splits["train"].class_names == list(fm.WNIDS) and len(splits["test"]) == 20
    assert data.read_words(tmp_path / "data" / "words.txt")["fm09"] == "Ankle boot"
    with pytest.raises(FileExistsError):
        fm.write_dataset(tmp_path / "raw")


def test_moving_clip_directions():
    photo = np.full((28, 28), 200, np.uint8)
    right = mm.clip(photo, "right", frames=5, size=40, offset=3)
    columns = [np.flatnonzero(frame.any(axis=0))[0] for frame in right]
    assert columns == [0, 3, 6, 9, 12] and all(np.flatnonzero(f.any(axis=1))[0] == 3 for f in right)
    np.testing.assert_array_equal(mm.clip(photo, "left", 5, 40, 3), right[::-1])
    down = mm.clip(photo, "down", 5, 40, 3)
    np.testing.assert_array_equal(down, np.transpose(right, (0, 2, 1)))
    # any single frame of one direction is a frame of the opposite one: order alone tells them apart
    assert sorted(map(bytes, right)) == sorted(map(bytes, mm.clip(photo, "left", 5, 40, 3)))


def test_moving_clips_layout(fake_fashion_mnist, tmp_path):
    counts = mm.write_clips(tmp_path / "clips", per_class=(2, 1, 1), frames=4, size=32)
    assert counts == {"train": 8, "val": 4, "test": 4}
    split = sequences.list_sequences(tmp_path / "clips" / "train")
    assert split.class_names == ["down", "left", "right", "up"] and split.layout == "class_folders"
    assert [len(s) for s in split.samples] == [4] * 8
