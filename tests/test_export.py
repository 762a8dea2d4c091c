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
jobs, out = json.load(open(sys.argv[1])), sys.argv[2]
results = []
for job in jobs:
    pixels = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in job["images"]])
    if job["clip"]:
        pixels = pixels[None]  # one clip of frames
    served = tf.saved_model.load(job["export"])
    result = {"float32": served.serve(tf.constant(pixels, tf.float32)).numpy().tolist(),
              "uint8": served.serve_uint8(tf.constant(pixels, tf.uint8)).numpy().tolist(),
              "signatures": sorted(served.signatures)}
    interpreter = tf.lite.Interpreter(model_path=job["export"] + "_tflite/model.tflite")
    runner = interpreter.get_signature_runner()
    name = list(runner.get_input_details())[0]
    result["tflite"] = [list(runner(**{name: item[None].astype(np.float32)}).values())[0][0].tolist()
                        for item in pixels]  # one image (or clip) per call
    results.append(result)
assert not any(m == "helpers" or m.startswith("helpers.") or m in ("cnn_rnn_classifier", "lrcn") for m in sys.modules)
json.dump(results, open(out, "w"))
"""


def served(tmp_path, jobs):
    """Each job's export (``{"export", "images", "clip"}``) loaded and run by TensorFlow alone, in one
    fresh process that imports nothing of the repository: per job, its outputs."""
    script, listed, out = tmp_path / "serve.py", tmp_path / "jobs.json", tmp_path / "served.json"
    script.write_text(SERVE)
    listed.write_text(json.dumps([{**job, "export": str(job["export"]), "images": list(map(str, job["images"]))}
                                  for job in jobs]))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, str(script), str(listed), str(out)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(out.read_text())


def exported_classifier(tmp_path):
    """The tiny classifier saved as a run's checkpoint, its ``classify`` checked, exported as a
    SavedModel and TFLite: ``(serving job, expected probabilities)``."""
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
    # an export never overwrites
    assert crc.main(["export", "--model", str(run / "phase2_best.keras"), "--output", str(tmp_path / "export")]) == 1
    return {"export": tmp_path / "export", "images": images, "clip": False}, expected


def exported_lrcn(tmp_path):
    """The tiny LRCN (3 frames) saved, its ``classify`` checked on a frame folder and on an array,
    exported: ``(serving job, expected probabilities)``."""
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
    return {"export": tmp_path / "export", "images": frames, "clip": True}, expected


@pytest.mark.tensorflow  # SavedModel / TFLite export
@pytest.mark.usefixtures("stand_in_backbones")  # the export graphs and the heads, not Xception or VGG16
def test_classifier_and_lrcn_exports_serve_raw_pixels_like_classify(tmp_path):
    """The classifier's export on images and the LRCN's on a clip's frames, served (SavedModel: float32
    and uint8 signatures; TFLite) in one fresh TensorFlow process: the probabilities ``classify`` gives."""
    (tmp_path / "classifier").mkdir()
    (tmp_path / "lrcn").mkdir()
    jobs, expected = zip(exported_classifier(tmp_path / "classifier"), exported_lrcn(tmp_path / "lrcn"))
    results = served(tmp_path, jobs)
    assert len(results) == 2
    assert {"serve", "serve_uint8", "serving_default"} <= set(results[0]["signatures"])
    for result, want in zip(results, expected):
        for key in ("float32", "uint8"):  # the same pixels, decoded by PIL on both sides
            np.testing.assert_allclose(result[key], want, atol=1e-5)
        np.testing.assert_allclose(result["tflite"], want, atol=1e-4)


def test_classify_refuses_bad_input(tmp_path):
    model = crc.build_cnn_rnn_classifier(num_classes=3, **TINY)
    with pytest.raises(UsageError, match="top_k"):
        crc.classify(model, [np.zeros((71, 71, 3))], top_k=0)
    with pytest.raises(UsageError, match="class names"):
        crc.classify(model, [np.zeros((71, 71, 3))], class_names=["a", "b"])
    with pytest.raises(UsageError, match=r"\(4, 4, 4\)"):
        crc.classify(model, [np.zeros((4, 4, 4))])
