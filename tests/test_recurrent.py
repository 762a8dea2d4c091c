import keras
import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")  # FusedLSTM's fused path is TensorFlow's
pytestmark = pytest.mark.tensorflow

from helpers.recurrent import FusedLSTM

RNG = np.random.default_rng(0)


def two_layer(cls, timesteps=5, features=7, units=4, **kwargs):
    inputs = keras.Input((timesteps, features))
    sequence = cls(units, return_sequences=True, **kwargs)(inputs)
    return keras.Model(inputs, [sequence, cls(units, **kwargs)(sequence)])


def outputs_and_gradients(model, x, **call):
    with tf.GradientTape() as tape:
        sequence, last = model(x, training=True, **call)
        loss = tf.reduce_sum(tf.sin(sequence)) + tf.reduce_sum(tf.cos(3 * last))
    return [sequence, last] + tape.gradient(loss, model.trainable_weights)


@pytest.mark.parametrize("use_bias", [True, False])
def test_same_outputs_and_gradients_as_keras_lstm(use_bias):
    reference = two_layer(keras.layers.LSTM, use_bias=use_bias)
    fused = two_layer(FusedLSTM, use_bias=use_bias)
    fused.set_weights([w + RNG.normal(0, 0.3, w.shape) for w in reference.get_weights()])
    reference.set_weights(fused.get_weights())
    x = RNG.normal(0, 1, (3, 5, 7)).astype("float32")
    assert fused.layers[1].fused_path_applies(tf.constant(x), None, True)
    expected = outputs_and_gradients(reference, x)
    eager = outputs_and_gradients(fused, x)
    traced = tf.function(lambda x: outputs_and_gradients(fused, x))(x)  # as in fit
    assert len(eager) == len(traced) == len(expected) == 2 + (6 if use_bias else 4)
    for want, have, have_traced in zip(expected, eager, traced):
        np.testing.assert_allclose(have, want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(have_traced, want, rtol=1e-5, atol=1e-6)


def test_initial_state_and_return_state():
    reference = keras.layers.LSTM(4, return_state=True)
    fused = FusedLSTM(4, return_state=True)
    x = RNG.normal(0, 1, (2, 6, 3)).astype("float32")
    reference(x), fused(x)
    fused.set_weights(reference.get_weights())
    state = [RNG.normal(0, 1, (2, 4)).astype("float32") for _ in range(2)]
    for want, have in zip(reference(x, initial_state=state), fused(x, initial_state=state)):
        np.testing.assert_allclose(have, want, rtol=1e-5, atol=1e-6)


def test_falls_back_to_keras_lstm_where_fusion_does_not_apply():
    layer = FusedLSTM(4, dropout=0.5)
    x = tf.zeros((2, 3, 5))
    layer(x)
    assert layer.fused_path_applies(x, None, training=False)
    assert not layer.fused_path_applies(x, None, training=True)  # dropout while training
    assert not layer.fused_path_applies(x, tf.ones((2, 3), bool), training=False)  # masked
    assert not FusedLSTM(4, activation="relu").fused_path_applies(x, None, False)
    assert not FusedLSTM(4, go_backwards=True).fused_path_applies(x, None, False)
    assert not FusedLSTM(4, unroll=True).fused_path_applies(x, None, False)
    # A masked call still gives keras.layers.LSTM's result (its own path).
    reference = keras.layers.LSTM(4)
    reference(x)
    layer = FusedLSTM(4)
    layer(x)
    layer.set_weights([w + 0.1 for w in reference.get_weights()])
    reference.set_weights(layer.get_weights())
    x = RNG.normal(0, 1, (2, 3, 5)).astype("float32")
    mask = np.array([[True, True, False], [True, False, False]])
    np.testing.assert_allclose(layer(x, mask=mask), reference(x, mask=mask), rtol=1e-6)


def test_weights_interchange_with_keras_lstm_and_safe_mode_load(tmp_path):
    fused = two_layer(FusedLSTM)
    path = tmp_path / "fused.keras"
    fused.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert isinstance(loaded.layers[1], FusedLSTM)
    assert loaded.layers[1].fused_path_applies(tf.zeros((2, 5, 7)), None, training=True)
    reference = two_layer(keras.layers.LSTM)
    reference.set_weights(loaded.get_weights())
    x = RNG.normal(0, 1, (2, 5, 7)).astype("float32")
    for want, have in zip(reference(x), fused(x)):
        np.testing.assert_allclose(have, want, rtol=1e-5, atol=1e-6)


def test_defers_to_cudnn_when_a_gpu_is_visible(monkeypatch):
    layer = FusedLSTM(4)
    x = tf.zeros((2, 3, 5))
    assert layer.fused_path_applies(x, None, training=True)
    monkeypatch.setattr(tf.config, "list_logical_devices",
                        lambda kind=None: [tf.config.LogicalDevice("/device:GPU:0", "GPU")] if kind == "GPU" else [])
    assert not layer.fused_path_applies(x, None, training=True)  # keras.layers.LSTM's own path: cuDNN
    assert FusedLSTM(4, use_cudnn=False).fused_path_applies(x, None, training=True)


def test_bfloat16_matmuls_stay_within_bfloat16_tolerance_of_float32():
    """matmul_dtype="bfloat16": the matmuls read bfloat16 (about 3 significant digits), weights, states
    and gradients stay float32; outputs and gradients stay within a few bfloat16 roundings of
    keras.layers.LSTM's float32 ones, at a length (23 steps) where errors would compound."""
    reference = two_layer(keras.layers.LSTM, timesteps=23, features=40, units=16)
    fused = two_layer(FusedLSTM, timesteps=23, features=40, units=16, matmul_dtype="bfloat16")
    fused.set_weights(reference.get_weights())
    x = RNG.normal(0, 1, (8, 23, 40)).astype("float32")
    expected = outputs_and_gradients(reference, x)
    have = tf.function(lambda x: outputs_and_gradients(fused, x))(x)
    assert all(w.dtype == "float32" for w in fused.weights) and all(h.dtype == tf.float32 for h in have)
    errors = []
    for want, got in zip(expected, have):
        scale = float(np.max(np.abs(want)))
        error = float(np.max(np.abs(np.asarray(got) - np.asarray(want)))) / scale
        errors.append(error)
        assert error < 2e-2, (error, scale)
    assert max(errors) > 1e-5  # bfloat16 was really used (float32 agrees to ~1e-6)
    float32 = two_layer(FusedLSTM, timesteps=23, features=40, units=16)
    float32.set_weights(reference.get_weights())
    for want, got in zip(expected, outputs_and_gradients(float32, x)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="matmul_dtype"):
        FusedLSTM(4, matmul_dtype="float16")
    config = fused.layers[1].get_config()
    assert FusedLSTM.from_config(config).matmul_dtype == "bfloat16"
