"""Saves tiny models of the three kinds on one Keras backend and checks them on another.

    KERAS_BACKEND=tensorflow python -m tests.backend_roundtrip save DIR
    KERAS_BACKEND=jax python -m tests.backend_roundtrip check DIR save DIR2
    KERAS_BACKEND=tensorflow python -m tests.backend_roundtrip check DIR2

``save`` writes ``DIR/<kind>.keras`` and ``DIR/<kind>.npz`` (inputs and the saving backend's
probabilities); ``check`` loads each model on its own backend, predicts the same inputs and
prints one JSON line: the largest absolute difference per kind; ``check DIR save DIR2`` then
moves the loaded models' weights again and saves them (the reverse direction, in the same
process). ``tests/test_backends.py`` runs the JAX step in a fresh process (TensorFlow hidden,
``tests.conftest.NoTensorFlow``, and its absence asserted) and calls ``save`` and ``check`` in its
own TensorFlow process.
"""

import json
import os
import sys
from pathlib import Path

if os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow":
    from tests.conftest import NoTensorFlow

    sys.meta_path.insert(0, NoTensorFlow())

import keras  # noqa: E402
import numpy as np  # noqa: E402

import captioning  # noqa: E402
import cnn_rnn_classifier  # noqa: E402
import lrcn  # noqa: E402
import tests.stand_in  # noqa: E402
from helpers import training  # noqa: E402


def tiny_models():
    """The three kinds at tiny sizes, on the stand-in backbones: the project's own layers cross the
    backends here (Xception's and VGG16's are Keras' own)."""
    tests.stand_in.install()
    keras.utils.set_random_seed(0)
    return {
        "classifier": cnn_rnn_classifier.build_cnn_rnn_classifier(num_classes=3, image_size=71, rnn_timesteps=71,
                                                                  rnn_units=8, weights=None),
        "lrcn": lrcn.build_lrcn(3, frames=2, image_size=32, dense_units=8, gru_units=8, weights=None),
        "captioner": captioning.build_captioner(vocabulary_size=9, image_size=71, embedding_dim=8, lstm_units=8,
                                                dropout=0.0, weights=None),
    }


def inputs(kind, rng):
    if kind == "classifier":
        return rng.uniform(-1, 1, (2, 71, 71, 3)).astype("float32")
    if kind == "lrcn":
        return rng.uniform(0, 255, (2, 2, 32, 32, 3)).astype("float32")
    return [rng.uniform(0, 255, (2, 71, 71, 3)).astype("float32"), np.array([[2, 5, 6, 0], [2, 7, 0, 0]], "int32")]


def save(folder, models=None):
    """Moves every trainable weight of ``models`` (default: new ``tiny_models()``) and saves them."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for kind, model in (models or tiny_models()).items():
        # every trainable weight moved off its initial value (biases and BatchNormalization's offsets
        # start at zero), so that each one shows in the output; the moving statistics stay valid
        for variable in model.trainable_weights:
            variable.assign(variable.numpy() + rng.normal(0, 0.05, variable.shape).astype(variable.dtype))
        x = inputs(kind, rng)
        training.save_lean(model, folder / f"{kind}.keras")
        arrays = {f"x{i}": a for i, a in enumerate(x if isinstance(x, list) else [x])}
        np.savez(folder / f"{kind}.npz", probabilities=model.predict(x, verbose=0), **arrays)


def check(folder):
    """Prints the JSON line; returns the loaded models by kind."""
    differences, models = {}, {}
    for kind in ("classifier", "lrcn", "captioner"):
        saved = np.load(folder / f"{kind}.npz")
        model = models[kind] = keras.saving.load_model(folder / f"{kind}.keras")
        x = [saved[f"x{i}"] for i in range(len(saved.files) - 1)]
        predicted = model.predict(x if len(x) > 1 else x[0], verbose=0)
        differences[kind] = float(np.abs(predicted - saved["probabilities"]).max())
    print(json.dumps({"backend": keras.backend.backend(), "max_abs_difference": differences,
                      "tensorflow_imported": "tensorflow" in sys.modules}))
    return models


if __name__ == "__main__":
    if sys.argv[1] == "save":
        save(Path(sys.argv[2]))
    else:
        loaded = check(Path(sys.argv[2]))
        if sys.argv[3:4] == ["save"]:
            save(Path(sys.argv[4]), loaded)
