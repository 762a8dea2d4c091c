"""Export for serving (the classifiers' SavedModel and TFLite taking raw pixels, the captioner's
SavedModel taking encoded images, all loaded by TensorFlow alone in one fresh process) and the
``classify`` and ``caption`` APIs they must agree with."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from PIL import Image

import captioning as cap
import cnn_rnn_classifier as crc
import lrcn
from helpers import captions, rundir
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
    served = tf.saved_model.load(job["export"])
    if job["kind"] == "captioner":  # encoded bytes in, caption strings out
        images = tf.constant([open(p, "rb").read() for p in job["images"]])
        results.append({"1": [c.decode() for c in served.caption_greedy(images).numpy()],
                        "3": [c.decode() for c in served.caption(images).numpy()],
                        "default": [c.decode() for c in
                                    served.signatures["serving_default"](images=images)["output_0"].numpy()]})
        continue
    pixels = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in job["images"]])
    if job["kind"] == "clip":
        pixels = pixels[None]  # one clip of frames
    result = {"float32": served.serve(tf.constant(pixels, tf.float32)).numpy().tolist(),
              "uint8": served.serve_uint8(tf.constant(pixels, tf.uint8)).numpy().tolist(),
              "signatures": sorted(served.signatures)}
    interpreter = tf.lite.Interpreter(model_path=job["export"] + "_tflite/model.tflite")
    runner = interpreter.get_signature_runner()
    name = list(runner.get_input_details())[0]
    result["tflite"] = [list(runner(**{name: item[None].astype(np.float32)}).values())[0][0].tolist()
                        for item in pixels]  # one image (or clip) per call
    results.append(result)
assert not [m for m in sys.modules if m.split(".")[0] in ("helpers", "tests", "cnn_rnn_classifier", "lrcn", "captioning")]
json.dump(results, open(out, "w"))
"""


def served(tmp_path, jobs):
    """Each job's export (``{"export", "images", "kind"}``; kind ``"images"``, ``"clip"`` or
    ``"captioner"``) loaded and run by TensorFlow alone, in one fresh process that imports nothing
    of the repository: per job, its outputs."""
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
    return {"export": tmp_path / "export", "images": images, "kind": "images"}, expected


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
    return {"export": tmp_path / "export", "images": frames, "kind": "clip"}, expected


CAPTION_WORDS = list(captions.SPECIAL_TOKENS) + [f"w{i}" for i in range(36)]


def saved_captioner(run, decoder):
    """A random untrained tiny captioner (``decoder``), 40 words of at most 7 per caption, saved as
    ``run/model.keras`` with its ``vocabulary.json``: returns ``run``."""
    vocabulary = captions.Vocabulary(CAPTION_WORDS, 7)
    keras.utils.set_random_seed(1)
    model = cap.build_captioner(vocabulary_size=len(vocabulary), image_size=71, embedding_dim=8, lstm_units=8,
                                decoder=decoder, attention_dim=8, dropout=0.0, weights=None)
    run.mkdir()
    model.save(run / "model.keras")
    vocabulary.save(run / "vocabulary.json")
    return run


def exported_captioners(tmp_path):
    """A random untrained captioner of each decoder (40 words: long, varied captions, some cut at
    max_length) saved with its vocabulary and exported with beam width 3; ``caption`` on five
    JPEG and PNG files of three sizes: ``(serving jobs, expected captions)``, greedy and beam."""
    rng = np.random.default_rng(7)
    files = []
    for i, (size, file_format) in enumerate([(71, "PNG"), (71, "PNG"), (71, "JPEG"), (90, "JPEG"), (50, "PNG")]):
        path = tmp_path / "images" / f"{i}.{file_format.lower()}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path, format=file_format)
        files.append(path)
    jobs, expected = [], []
    for decoder in cap.DECODERS:
        run = saved_captioner(tmp_path / decoder, decoder)
        assert cap.main(["export", "--model", str(run / "model.keras"), "--output", str(run / "served"),
                         "--beam-size", "3"]) == 0
        by_width = {width: cap.caption(run / "model.keras", files, beam_size=width) for width in (1, 3)}
        assert len(set(by_width[3])) > 1 and by_width[1] != by_width[3]
        jobs.append({"export": run / "served", "images": files, "kind": "captioner"})
        expected.append(by_width)
    return jobs, expected


@pytest.mark.tensorflow  # SavedModel / TFLite export
@pytest.mark.usefixtures("stand_in_backbones")  # the export graphs, heads and searches, not Xception or VGG16
@pytest.mark.heavy
def test_exports_serve_raw_inputs_like_the_python_apis_in_one_fresh_tensorflow_process(tmp_path):
    """Every export, served by TensorFlow alone in one fresh process that imports nothing of the
    repository: the classifier's on images and the LRCN's on a clip's frames (SavedModel float32 and
    uint8 signatures, TFLite) give the probabilities ``classify`` gives; each captioner's SavedModel
    takes JPEG and PNG bytes and returns, greedy and beam, the captions ``captioning.caption`` gives
    (the ``caption`` command's)."""
    for name in ("classifier", "lrcn", "captioner"):
        (tmp_path / name).mkdir()
    jobs, expected = zip(exported_classifier(tmp_path / "classifier"), exported_lrcn(tmp_path / "lrcn"))
    caption_jobs, expected_captions = exported_captioners(tmp_path / "captioner")
    results = served(tmp_path, [*jobs, *caption_jobs])
    assert len(results) == 4
    assert {"serve", "serve_uint8", "serving_default"} <= set(results[0]["signatures"])
    for result, want in zip(results, expected):
        for key in ("float32", "uint8"):  # the same pixels, decoded by PIL on both sides
            np.testing.assert_allclose(result[key], want, atol=1e-5)
        np.testing.assert_allclose(result["tflite"], want, atol=1e-4)
    for decoder, result, want in zip(cap.DECODERS, results[2:], expected_captions):
        assert result["1"] == want[1], decoder
        assert result["3"] == want[3] == result["default"], decoder


def test_classify_refuses_bad_input(tmp_path):
    model = crc.build_cnn_rnn_classifier(num_classes=3, **TINY)
    with pytest.raises(UsageError, match="top_k"):
        crc.classify(model, [np.zeros((71, 71, 3))], top_k=0)
    with pytest.raises(UsageError, match="class names"):
        crc.classify(model, [np.zeros((71, 71, 3))], class_names=["a", "b"])
    with pytest.raises(UsageError, match=r"\(4, 4, 5\)"):
        crc.classify(model, [np.zeros((4, 4, 5))])


@pytest.mark.tensorflow
def test_the_served_image_reader_refuses_16_bit_pngs_as_caption_does(tmp_path):
    import tensorflow as tf

    from helpers import data, export

    Image.fromarray(np.full((8, 8), 30000, np.uint16)).save(tmp_path / "wide.png")
    with pytest.raises(data.DatasetError, match="16-bit"):
        data.read_rgb(tmp_path / "wide.png")
    with pytest.raises(tf.errors.InvalidArgumentError, match="a 16-bit PNG"):
        export.graph_read_image(tf.constant((tmp_path / "wide.png").read_bytes()), 8)
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(tmp_path / "ok.png")
    served = export.graph_read_image(tf.constant((tmp_path / "ok.png").read_bytes()), 8).numpy()
    np.testing.assert_array_equal(served, data.read_rgb(tmp_path / "ok.png", 8))


# ---------------------------------------------------------------- ONNX

def onnx_probabilities(model_file, inputs):
    """``inputs`` through ONNX Runtime alone: the exported model's probabilities."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    (name,) = [i.name for i in session.get_inputs()]
    return session.run(None, {name: np.asarray(inputs, np.float32)})[0]


@pytest.mark.tensorflow  # tf2onnx converts the TensorFlow graph
@pytest.mark.usefixtures("stand_in_backbones")  # the export graphs and heads, not Xception or VGG16
def test_onnx_exports_serve_raw_inputs_like_classify_in_onnx_runtime(tmp_path):
    """``export --format onnx``: the classifier's ``model.onnx`` on real JPEGs (raw RGB 0..255, as
    ``classify`` reads them), the LRCN's on a clip's frames and on padded feature clips, give
    ``classify``'s probabilities within 1e-4 in ONNX Runtime, at any batch size (and frame count)."""
    pytest.importorskip("tf2onnx")
    pytest.importorskip("onnxruntime")
    from helpers import data

    # the classifier: three images in one batch and one alone
    keras.utils.set_random_seed(0)
    model = crc.build_cnn_rnn_classifier(num_classes=3, **TINY)
    run = tmp_path / "classifier"
    run.mkdir()
    model.save(run / "phase2_best.keras")
    names = ["cat", "dog", "fox"]
    (run / rundir.CLASSES).write_text(json.dumps({"class_names": names}))
    images = [write_jpeg(tmp_path / f"{i}.jpg", seed=i, size=90) for i in range(3)]
    expected = np.array([[dict(r)[n] for n in names] for r in crc.classify(run / "phase2_best.keras", images, 3)])
    assert crc.main(["export", "--model", str(run / "phase2_best.keras"), "--output", str(tmp_path / "onnx"),
                     "--format", "onnx"]) == 0
    assert json.loads((tmp_path / "onnx" / rundir.CLASSES).read_text())["class_names"] == names
    pixels = np.stack([data.rgb_array(path, 71, str(path)) for path in images])
    np.testing.assert_allclose(onnx_probabilities(tmp_path / "onnx" / "model.onnx", pixels), expected, atol=1e-4)
    np.testing.assert_allclose(onnx_probabilities(tmp_path / "onnx" / "model.onnx", pixels[1:2]), expected[1:2],
                               atol=1e-4)
    # with test-time flips: classify(tta="flip")'s probabilities
    flipped = np.array([[dict(r)[n] for n in names] for r in crc.classify(run / "phase2_best.keras", images, 3,
                                                                          tta="flip")])
    assert crc.main(["export", "--model", str(run / "phase2_best.keras"), "--output", str(tmp_path / "onnx_flip"),
                     "--format", "onnx", "--tta", "flip"]) == 0
    np.testing.assert_allclose(onnx_probabilities(tmp_path / "onnx_flip" / "model.onnx", pixels), flipped, atol=1e-4)
    assert np.abs(flipped - expected).max() > 1e-4

    # the LRCN on frames (variable length) and on feature clips with padding
    for kind, build, clips in (
            ("frames", dict(image_size=32, weights=None),
             [np.stack([data.rgb_array(write_jpeg(tmp_path / "clip" / f"{t}.jpg", seed=10 + t, size=32), 32, "f")
                        for t in range(4)])]),
            ("features", dict(feature_width=6),
             [np.random.default_rng(2).normal(0, 1, (frames, 6)).astype(np.float32) for frames in (5, 3)])):
        keras.utils.set_random_seed(1)
        model = lrcn.build_lrcn(num_classes=2, frames=None, dense_units=8, gru_units=4, **build)
        run = tmp_path / f"lrcn_{kind}"
        run.mkdir()
        model.save(run / "model.keras")
        expected = np.array([[p for _, p in sorted(ranked, key=lambda item: item[0])]
                             for ranked in lrcn.classify(run / "model.keras", clips, top_k=2, class_names=["a", "b"])])
        assert lrcn.main(["export", "--model", str(run / "model.keras"), "--output", str(run / "onnx"),
                          "--format", "onnx"]) == 0
        longest = max(len(clip) for clip in clips)
        padded = np.full((len(clips), longest, *clips[0].shape[1:]), -1.0, np.float32)  # as the SavedModel takes them
        for row, clip in enumerate(clips):
            padded[row, :len(clip)] = clip
        np.testing.assert_allclose(onnx_probabilities(run / "onnx" / "model.onnx", padded), expected, atol=1e-4)


@pytest.mark.tensorflow
def test_onnx_export_names_what_it_needs_when_it_is_missing(tmp_path, monkeypatch, caplog):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tf2onnx" else real(name, *a))
    model = tmp_path / "model.keras"
    assert crc.main(["export", "--model", str(model), "--output", str(tmp_path / "out"), "--format", "onnx"]) == 1
    assert "export --format onnx needs tf2onnx, which this Python environment does not have: pip install -r " \
           "requirements-onnx.txt" in caplog.text
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(keras.backend.backend() == "tensorflow", reason="what ONNX export says on the other backends")
def test_onnx_export_on_another_backend_says_in_one_line_what_it_needs(tmp_path, caplog):
    assert lrcn.main(["export", "--model", str(tmp_path / "model.keras"), "--output", str(tmp_path / "out"),
                      "--format", "onnx"]) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "\n" not in errors[0]
    assert "export --format onnx converts the model's TensorFlow graph (tf2onnx): run it with " \
           "KERAS_BACKEND=tensorflow after pip install -r requirements.txt -r requirements-onnx.txt" in errors[0]


@pytest.mark.tensorflow  # tf2onnx converts the TensorFlow graph
@pytest.mark.usefixtures("stand_in_backbones")  # the decoders, not Xception
def test_onnx_captioner_encoder_and_step_decode_greedily_as_caption_does(tmp_path):
    """``captioning.py export --format onnx``: with ``encoder.onnx`` and ``decoder_step.onnx`` in
    ONNX Runtime, a greedy loop in numpy (the one the docstring describes) gives ``caption``'s
    greedy captions, for both decoders."""
    pytest.importorskip("tf2onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    from helpers import data, export

    rng = np.random.default_rng(7)
    files = []
    for i in range(3):
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (80, 80, 3), dtype=np.uint8)).save(files[-1])
    vocabulary = captions.Vocabulary(CAPTION_WORDS, 7)
    for decoder in cap.DECODERS:
        run = saved_captioner(tmp_path / decoder, decoder)
        assert cap.main(["export", "--model", str(run / "model.keras"), "--output", str(run / "onnx"),
                         "--format", "onnx"]) == 0
        assert captions.Vocabulary.load(run / "onnx" / rundir.VOCABULARY).tokens == vocabulary.tokens
        encoder = onnxruntime.InferenceSession(str(run / "onnx" / export.ENCODER_ONNX))
        step = onnxruntime.InferenceSession(str(run / "onnx" / export.DECODER_STEP_ONNX))
        pixels = np.stack([data.rgb_array(path, 71, str(path)) for path in files])
        h, c, *image = encoder.run(None, {"pixels": pixels})
        names = [i.name for i in step.get_inputs()]
        tokens, words, done = np.full(len(files), captions.START_ID, np.int32), [[] for _ in files], np.zeros(3, bool)
        for _ in range(vocabulary.max_length):
            log_probs, h, c = step.run(None, dict(zip(names, [tokens, h, c, *image])))
            log_probs[:, [captions.PAD_ID, captions.START_ID, captions.UNK_ID]] = -np.inf
            tokens = log_probs.argmax(axis=1).astype(np.int32)
            for row in np.flatnonzero(~done):
                words[row].append(int(tokens[row]))
            done |= tokens == captions.END_ID
        assert [vocabulary.decode(w) for w in words] == cap.caption(run / "model.keras", files, beam_size=1), decoder
