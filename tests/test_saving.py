"""Saved models of every kind load in safe mode in a fresh process where only ``helpers.layers``
is imported (what a user's serving code imports), and predict as before."""

import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

import captioning as cap
import cnn_rnn_classifier as crc
import lrcn
from helpers.captions import START_ID

ROOT = Path(__file__).resolve().parents[1]

LOAD = """
import sys
from pathlib import Path
import numpy as np, keras, helpers.layers
folder = Path(sys.argv[1])
for path in sorted(folder.glob("*.keras")):
    model = keras.saving.load_model(path, safe_mode=True)
    arrays = np.load(folder / (path.stem + ".npz"))
    inputs = [arrays[f"x{i}"] for i in range(len(arrays.files) - 1)]
    out = model.predict(inputs if len(inputs) > 1 else inputs[0], verbose=0)
    assert np.allclose(out, arrays["y"], rtol=1e-5, atol=1e-6), (path.stem, abs(out - arrays["y"]).max())
    print(path.stem)
assert not {"captioning", "cnn_rnn_classifier", "lrcn"} & set(sys.modules)
"""


@pytest.mark.usefixtures("stand_in_backbones")  # the project's registered layers are under test, not Xception's
@pytest.mark.heavy
def test_saved_models_load_in_safe_mode_in_a_fresh_process(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.uniform(0, 255, (1, 71, 71, 3)).astype(np.float32)
    keras.utils.set_random_seed(0)
    models = {
        "classifier": (crc.build_cnn_rnn_classifier(num_classes=3, image_size=71, rnn_timesteps=71, rnn_units=8,
                                                    weights=None), [images]),
        "lrcn_variable_length": (lrcn.build_lrcn(3, frames=None, image_size=32, dense_units=16, gru_units=8,
                                                 weights=None), [rng.uniform(0, 255, (1, 4, 32, 32, 3)).astype("float32")]),
    }
    for decoder in cap.DECODERS:
        captioner = cap.build_captioner(vocabulary_size=12, image_size=71, embedding_dim=8, lstm_units=8,
                                        decoder=decoder, attention_dim=8, dropout=0.0, weights=None)
        models[f"captioner_{decoder}"] = (captioner, [images, np.array([[START_ID, 5, 6]], np.int32)])
    for name, (model, inputs) in models.items():
        model.save(tmp_path / f"{name}.keras")
        expected = model.predict(inputs if len(inputs) > 1 else inputs[0], verbose=0)
        np.savez(tmp_path / f"{name}.npz", y=expected, **{f"x{i}": x for i, x in enumerate(inputs)})
    result = subprocess.run([sys.executable, "-c", LOAD, str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == sorted(models)
