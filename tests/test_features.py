"""helpers.features: the frozen-backbone feature cache is exact, reused, and invalidated by any change
of the encoder's weights, its input size or the image files."""

import logging
import os

import keras
import numpy as np
import pytest

from helpers import features, precision
from tests.conftest import write_jpeg


def tiny_encoder(size=16, seed=0):
    keras.utils.set_random_seed(seed)
    image = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(4, 3)(keras.layers.Rescaling(1 / 255)(image))
    return keras.Model(image, keras.layers.GlobalAveragePooling2D()(x))


def encoder_with_backbone(policy):
    """A tiny encoder whose convolutions are a nested model built under ``policy``, as the scripts
    build Xception under ``--mixed-precision``."""
    keras.utils.set_random_seed(0)
    with precision.policy_scope(policy):
        inner = keras.Input((16, 16, 3))
        backbone = keras.Model(inner, keras.layers.Conv2D(4, 3)(keras.layers.Rescaling(1 / 255)(inner)))
    image = keras.Input((16, 16, 3))
    return keras.Model(image, keras.layers.GlobalAveragePooling2D(dtype="float32")(backbone(image)))


def must_not_run(*args, **kwargs):
    raise AssertionError("the encoder ran although the cache is valid")


@pytest.fixture
def paths(tmp_path):
    return [write_jpeg(tmp_path / "images" / f"{i}.jpg", i, size=20) for i in range(5)]


def test_cached_features_equal_the_encoder_and_are_reused(paths, tmp_path, monkeypatch, caplog):
    encoder = tiny_encoder()
    cached = features.cached_features(encoder, paths, tmp_path / "cache", "train", batch_size=2)
    images = np.concatenate([features.ImageBatches(paths, 16, 2)[i] for i in range(3)])
    np.testing.assert_allclose(cached, encoder.predict(images, verbose=0), rtol=1e-6, atol=1e-6)
    assert len(list((tmp_path / "cache").glob("train-*.npy"))) == 1
    monkeypatch.setattr(encoder, "predict", must_not_run)
    caplog.set_level(logging.INFO)
    np.testing.assert_array_equal(features.cached_features(encoder, paths, tmp_path / "cache", "train"), cached)
    assert "read from the cache" in caplog.text


def test_a_saved_and_loaded_bfloat16_encoder_reads_the_cache_of_the_one_saved(paths, tmp_path, monkeypatch):
    # load_model gives a nested model and its input layer the float32 policy back (the layers
    # inside keep mixed_bfloat16): the captioner's phase 3, on the loaded phase-1 model, computed
    # every feature again.
    encoder = encoder_with_backbone("mixed_bfloat16")
    cached = features.cached_features(encoder, paths, tmp_path / "cache", "train")
    encoder.save(tmp_path / "encoder.keras")
    loaded = keras.saving.load_model(tmp_path / "encoder.keras")
    monkeypatch.setattr(loaded, "predict", must_not_run)
    np.testing.assert_array_equal(features.cached_features(loaded, paths, tmp_path / "cache", "train"), cached)
    # the policies the layers compute with still count
    float32 = encoder_with_backbone("float32")
    assert features.cache_key(float32, paths) != features.cache_key(encoder, paths)
    assert not np.array_equal(float32.predict(features.ImageBatches(paths, 16, 5)[0], verbose=0), cached)


@pytest.mark.parametrize("change", ["weights", "image size", "file touched", "file list"])
def test_any_change_computes_the_features_again(paths, tmp_path, change):
    encoder = tiny_encoder()
    before = features.cached_features(encoder, paths, tmp_path / "cache", "train")
    (old_file,) = (tmp_path / "cache").glob("train-*.npy")
    if change == "weights":
        encoder = tiny_encoder(seed=1)
    elif change == "image size":
        encoder = tiny_encoder(size=20)
    elif change == "file touched":
        write_jpeg(paths[2], 99, size=20)
        os.utime(paths[2], ns=(1, 10**18))
    else:
        paths = paths[:4]
    after = features.cached_features(encoder, paths, tmp_path / "cache", "train")
    (new_file,) = (tmp_path / "cache").glob("train-*.npy")  # one file: the stale one is gone
    assert new_file.name != old_file.name and len(after) == len(paths)
    if change == "file list":
        np.testing.assert_allclose(after, before[:4], rtol=1e-6)
    elif change == "file touched":
        assert not np.allclose(after[2], before[2]) and np.allclose(after[0], before[0])
    else:
        assert not np.allclose(after, before)


def test_a_damaged_cache_file_is_computed_again(paths, tmp_path, caplog):
    encoder = tiny_encoder()
    before = features.cached_features(encoder, paths, tmp_path / "cache", "train")
    (cache_file,) = (tmp_path / "cache").glob("train-*.npy")
    cache_file.write_bytes(cache_file.read_bytes()[:40])
    np.testing.assert_allclose(features.cached_features(encoder, paths, tmp_path / "cache", "train"), before)
    assert "unreadable" in caplog.text
