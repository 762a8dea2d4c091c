import keras
import numpy as np
import pytest

import cnn_rnn_classifier as crc
import lrcn
from helpers import precision, training

RNG = np.random.default_rng(0)


@pytest.mark.parametrize("capability, cpu_bf16, expected", [
    (None, True, "mixed_bfloat16"), (None, False, "float32"),
    ((9, 0), False, "mixed_bfloat16"), ((8, 0), False, "mixed_bfloat16"),
    ((7, 5), True, "mixed_float16"), ((6, 1), True, "float32"),
])
def test_auto_follows_the_device(monkeypatch, capability, cpu_bf16, expected):
    monkeypatch.setattr(precision, "gpu_compute_capability", lambda: capability)
    monkeypatch.setattr(precision, "cpu_supports_bfloat16", lambda: cpu_bf16)
    assert precision.resolve("auto") == expected


def test_explicit_choices_and_unknown_choice():
    assert [precision.resolve(c) for c in ("off", "bfloat16", "float16")] == [
        "float32", "mixed_bfloat16", "mixed_float16"]
    with pytest.raises(ValueError, match="float64"):
        precision.resolve("float64")


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("flags\t\t: fpu avx512f avx512_bf16 avx512_vnni\n")
    assert precision.cpu_supports_bfloat16(info)
    info.write_text("flags\t\t: fpu avx2\n")
    assert not precision.cpu_supports_bfloat16(info)
    assert not precision.cpu_supports_bfloat16(tmp_path / "missing")


def tiny_classifier(mixed_precision):
    keras.utils.set_random_seed(1)
    return crc.build_cnn_rnn_classifier(num_classes=3, image_size=71, rnn_timesteps=71, rnn_units=8, weights=None,
                                         mixed_precision=mixed_precision)


BATCH = np.random.default_rng(2).uniform(-1, 1, (4, 71, 71, 3)).astype("float32")  # Xception's input range


def two_steps(model, weights, jit_compile=False):
    """The losses of two SGD steps on a fixed batch (before and after one update)."""
    model.set_weights(weights)
    crc.compile_classifier(model, keras.optimizers.SGD(0.1), jit_compile=jit_compile)
    y = np.eye(3)[[0, 1, 2, 0]]
    return [model.train_on_batch(BATCH, y)[0] for _ in range(2)]


def xception_features(model):
    """The backbone's pooled features of ``BATCH``: (4, 2048) float32."""
    return np.asarray(model.get_layer("xception").predict_on_batch(BATCH), "float32")


@pytest.fixture(scope="module")
def float32_xception():
    """A float32 tiny classifier on the real Xception: its weights and Xception's features, computed once."""
    model = tiny_classifier("off")
    return model.get_weights(), xception_features(model)


@pytest.mark.xdist_group("float32_xception")  # one worker builds the float32 Xception for both
@pytest.mark.parametrize("mixed_precision, tolerance", [("bfloat16", 0.02), ("float16", 0.005)])
def test_mixed_precision_xception_computes_the_float32_features(float32_xception, mixed_precision, tolerance):
    """The real Xception, every layer, in the mixed policy: the same features (relative error over
    the batch) from the same weights; its training: the stand-in test below."""
    weights, want = float32_xception
    model = tiny_classifier(mixed_precision)
    compute = precision.POLICIES[mixed_precision][len("mixed_"):]
    xception = model.get_layer("xception")
    assert {layer.dtype_policy.compute_dtype for layer in xception.layers[1:]} == {compute}
    model.set_weights(weights)
    got = xception_features(model)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < tolerance
    assert np.abs(got - want).max() > 0  # computed in the lower precision, not float32


@pytest.fixture(scope="module")
def float32_steps():
    """The float32 tiny classifier on the stand-in backbone: its initial weights and the losses of
    ``two_steps`` from them, computed once for the mixed-precision and XLA comparisons."""
    from tests.conftest import stand_in_backbones_patched

    with stand_in_backbones_patched():
        model = tiny_classifier("off")
        weights = model.get_weights()
        want = two_steps(model, weights)
    assert want[1] < want[0]  # the step learned something
    return weights, want


@pytest.mark.xdist_group("float32_steps")  # one worker computes the float32 steps for all three
@pytest.mark.usefixtures("stand_in_backbones")  # the training step under the policy, not Xception (above)
@pytest.mark.parametrize("mixed_precision, tolerance", [("bfloat16", 0.02), ("float16", 0.005)])
def test_mixed_precision_training_steps_agree_with_float32(float32_steps, mixed_precision, tolerance):
    weights, want = float32_steps
    model = tiny_classifier(mixed_precision)
    compute = precision.POLICIES[mixed_precision][len("mixed_"):]
    assert model.get_layer("xception").dtype_policy.compute_dtype == compute
    assert model.get_layer("rnn_lstm_1").dtype_policy.name == "float32"
    assert model.output.dtype == "float32"
    got = two_steps(model, weights)
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer) == (mixed_precision == "float16")
    np.testing.assert_allclose(got, want, rtol=tolerance)


@pytest.mark.xdist_group("float32_steps")
@pytest.mark.usefixtures("stand_in_backbones")  # XLA against the default path, not Xception
def test_jit_compile_agrees_with_default(float32_steps):
    weights, want = float32_steps
    np.testing.assert_allclose(two_steps(tiny_classifier("off"), weights, jit_compile=True), want, rtol=1e-4)


@pytest.mark.heavy
def test_lrcn_mixed_precision_backbone():
    model = lrcn.build_lrcn(num_classes=3, frames=4, image_size=32, dense_units=16, gru_units=8, weights=None,
                            mixed_precision="bfloat16")
    vgg16 = [layer for layer in precision.all_layers(model) if layer.name == "vgg16"][0]
    assert vgg16.dtype_policy.name == "mixed_bfloat16"
    assert training.find_layer(model, "gru").dtype_policy.name == "float32"
    model.compile(optimizer=precision.loss_scaled(model, lrcn.sgd(0.01)), loss="categorical_crossentropy")
    loss = model.train_on_batch(RNG.uniform(0, 255, (2, 4, 32, 32, 3)).astype("float32"), np.eye(3)[[0, 1]])
    assert np.isfinite(loss)
