import keras
import numpy as np
import pytest

from helpers.optimizers import FusedAdam


def train(optimizer, steps=5):
    """Weights of a small model after ``steps`` full-batch steps (same data and start each time)."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(3)])
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(32, 6)).astype("float32"), rng.integers(0, 3, 32)
    model.fit(x, y, batch_size=32, epochs=steps, verbose=0, shuffle=False)
    return model.get_weights()


@pytest.mark.parametrize("kwargs", [dict(learning_rate=0.01), dict(learning_rate=0.01, clipnorm=0.05, epsilon=1e-3)])
def test_fused_adam_updates_as_keras_adam(kwargs):
    expected, found = train(keras.optimizers.Adam(**kwargs)), train(FusedAdam(**kwargs))
    start = train(keras.optimizers.Adam(**kwargs), steps=0)
    assert any(np.abs(e - s).max() > 1e-3 for e, s in zip(expected, start))  # the steps moved the weights
    for e, f in zip(expected, found):
        np.testing.assert_allclose(f, e, rtol=1e-5, atol=1e-6)


def test_fused_adam_round_trips_its_config():
    optimizer = FusedAdam(learning_rate=3e-4, clipnorm=1.0)
    again = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert type(again) is FusedAdam and again.get_config()["clipnorm"] == 1.0
