"""Export for serving (SavedModel and TFLite taking raw pixels, loaded by TensorFlow alone in a
fresh process) and the ``classify`` API it must agree with."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from PIL import Image

import cnn_rnn_classifier as crc
import lrcn
from helpers import rundir
from helpers.errors import UsageError
from tests.conftest import CLASSIFIER_TINY as TINY, write_jpeg

# ---------------------------------------------------------------- export and classify

SERVE = """
import json, sys
import numpy as np
import tensorflow as tf
from PIL import Image
export, images, out = sys.argv[1], sys.argv[2].split(","), sys.argv[3]
pixels = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in images])
if len(sys.argv) > 4:
    pixels = pixels[None]  # one clip of frames
served = tf.saved_model.load(export)
results = {"float32": served.serve(tf.constant(pixels, tf.float32)).numpy().tolist(),
           "uint8": served.serve_uint8(tf.constant(pixels, tf.uint8)).numpy().tolist(),
           "signatures": sorted(served.signatures)}
interpreter = tf.lite.Interpreter(model_path=export + "_tflite/model.tflite")
runner = interpreter.get_signature_runner()
name = list(runner.get_input_details())[0]
results["tflite"] = [list(runner(**{name: item[None].astype(np.float32)}).values())[0][0].tolist()
                     for item in pixels]  # one image (or clip) per call
assert not any(m == "helpers" or m.startswith("helpers.") or m in ("cnn_rnn_classifier", "lrcn") for m in sys.modules)
json.dump(results, open(out, "w"))
"""


def served(tmp_path, export, images, clip=False):
    script = tmp_path / "serve.py"
    script.write_text(SERVE)
    out = tmp_path / "served.json"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    command = [sys.executable, str(script), str(export), ",".join(map(str, images)), str(out)] + (["clip"] if clip else [])
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(out.read_text())


@pytest.mark.tensorflow  # SavedModel / TFLite export
@pytest.mark.usefixtures("stand_in_backbones")  # the export graph and the head, not Xception
def test_classifier_export_serves_raw_pixels_like_classify(tmp_path):
    keras.utils.set_random_seed(0)
    model = crc.build_cnn_rnn_classifier(num_classes=3, **TINY)
    run = tmp_path / "run"
    run.mkdir()
    model.save(run / "phase2_best.keras")
    names = ["cat", "dog", "fox"]
    (run / rundir.CLASSES).write_text(json.dumps({"class_names": names}))
    images = [write_jpeg(tmp_path / f"{i}.jpg", seed=i, size=71) for i in range(3)]
    ranked = crc.classify(run / "phase2_best.keras", images, top_k=3)
    assert [len(r) for r in ranked] == [3, 3, 3] and all(n in names for r in ranked for n, _ in r)
    expected = np.array([[dict(r)[n] for n in names] for r in ranked])
    np.testing.assert_allclose(expected.sum(axis=1), 1, rtol=1e-5)
    arrays = crc.classify(model, [np.asarray(Image.open(p)) for p in images], top_k=1, class_names=names)
    assert [r[0][0] for r in arrays] == [r[0][0] for r in ranked]

    for fmt, folder in (("saved_model", tmp_path / "export"), ("tflite", tmp_path / "export_tflite")):
        assert crc.main(["export", "--model", str(run / "phase2_best.keras"), "--output", str(folder),
                         "--format", fmt]) == 0
        assert json.loads((folder / rundir.CLASSES).read_text())["class_names"] == names
    result = served(tmp_path, tmp_path / "export", images)
    assert {"serve", "serve_uint8", "serving_default"} <= set(result["signatures"])
    for key in ("float32", "uint8"):  # the same pixels, decoded by PIL on both sides
        np.testing.assert_allclose(result[key], expected, atol=1e-5)
    np.testing.assert_allclose(result["tflite"], expected, atol=1e-4)
    # an export never overwrites
    assert crc.main(["export", "--model", str(run / "phase2_best.keras"), "--output", str(tmp_path / "export")]) == 1


@pytest.mark.tensorflow  # SavedModel / TFLite export
@pytest.mark.usefixtures("stand_in_backbones")  # the export graph over frames and the head, not VGG16
def test_lrcn_export_serves_raw_frames_like_classify(tmp_path):
    keras.utils.set_random_seed(0)
    model = lrcn.build_lrcn(num_classes=2, frames=3, image_size=32, dense_units=8, gru_units=4, weights=None)
    run = tmp_path / "run"
    run.mkdir()
    model.save(run / "phase2_best.keras")
    (run / rundir.CLASSES).write_text(json.dumps({"class_names": ["jump", "run"]}))
    clip = tmp_path / "clip"
    frames = [write_jpeg(clip / f"frame_{t:03d}.jpg", seed=t, size=32) for t in range(3)]
    ranked = lrcn.classify(run / "phase2_best.keras", [clip], top_k=2)[0]
    expected = np.array([[dict(ranked)[n] for n in ("jump", "run")]])
    array_ranked = lrcn.classify(model, [np.stack([np.asarray(Image.open(f)) for f in frames])], top_k=2,
                                 class_names=["jump", "run"])[0]
    np.testing.assert_allclose([p for _, p in array_ranked], [p for _, p in ranked], atol=1e-6)
    for fmt, folder in (("saved_model", tmp_path / "export"), ("tflite", tmp_path / "export_tflite")):
        assert lrcn.main(["export", "--model", str(run / "phase2_best.keras"), "--output", str(folder),
                          "--format", fmt]) == 0
    result = served(tmp_path, tmp_path / "export", frames, clip=True)
    for key in ("float32", "uint8"):
        np.testing.assert_allclose(result[key], expected, atol=1e-5)
    np.testing.assert_allclose(result["tflite"], expected, atol=1e-4)


def test_classify_refuses_bad_input(tmp_path):
    model = crc.build_cnn_rnn_classifier(num_classes=3, **TINY)
    with pytest.raises(UsageError, match="top_k"):
        crc.classify(model, [np.zeros((71, 71, 3))], top_k=0)
    with pytest.raises(UsageError, match="class names"):
        crc.classify(model, [np.zeros((71, 71, 3))], class_names=["a", "b"])
    with pytest.raises(UsageError, match=r"\(4, 4, 4\)"):
        crc.classify(model, [np.zeros((4, 4, 4))])
