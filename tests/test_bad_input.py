"""Bad input, as a hostile user gives it: each case gets one clear line (naming the file, flag or
model) or the right result, never a wrong output without a word. docs/bad_input.md lists the cases.

Real files throughout: tiny models of the three kinds saved as .keras, AVI videos written with
OpenCV, 16-bit, EXIF-rotated, TIFF and PPM images written with Pillow, captioned photos.
"""

import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

import captioning as cap
import cnn_rnn_classifier as crc
import lrcn
from helpers import backend, captions, data, extract_frames, features, rundir, sequences, training
from helpers.backbones import WeightsUnavailableError, pretrained_backbone
from helpers.data import DatasetError
from helpers.errors import UsageError
from tests.conftest import make_class_folders, make_flickr8k, stand_in_backbones_patched, write_jpeg, write_video

SCRIPTS = {"classifier": crc, "lrcn": lrcn, "captioner": cap}
pytestmark = pytest.mark.xdist_group("saved_models")  # one worker builds the module's saved models


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    """A tiny saved model of each kind, with the run files beside it: ``{kind: path}``."""
    root = tmp_path_factory.mktemp("models")
    keras.utils.set_random_seed(0)
    with stand_in_backbones_patched():  # the commands' checks, not the backbones, are under test
        models = {
            "classifier": crc.build_cnn_rnn_classifier(num_classes=3, image_size=71, rnn_timesteps=71, rnn_units=8,
                                                       weights=None),
            "lrcn": lrcn.build_lrcn(3, frames=2, image_size=32, dense_units=8, gru_units=8, weights=None),
            "captioner": cap.build_captioner(vocabulary_size=8, image_size=71, embedding_dim=8, lstm_units=8,
                                             dropout=0.0, weights=None),
        }
    paths = {}
    for kind, model in models.items():
        folder = root / kind
        folder.mkdir()
        paths[kind] = folder / "phase2_best.keras"
        training.save_lean(model, paths[kind])
        rundir.write_text(folder / rundir.CLASSES, json.dumps({"class_names": ["cat", "dog", "fox"]}))
    captions.Vocabulary(list(captions.SPECIAL_TOKENS) + ["a", "red", "blue", "picture"], 4).save(
        root / "captioner" / rundir.VOCABULARY)
    return paths


def error_line(main, argv, caplog):
    """Runs a script's ``main`` expecting exit code 1; returns its one logged error line."""
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert main(argv) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    return errors[0]


# ---------------------------------------------------------------- every saved model knows what it is

def commands(kind, model, tmp_path):
    """Every command of ``kind``'s script that takes ``--model``, with inputs it would accept."""
    photo = write_jpeg(tmp_path / "in" / "photo.jpg", 0, size=20)
    folder = make_class_folders(tmp_path / "data", per_class=(2, 1, 1))
    argv = {
        "classifier": [["evaluate", "--data-dir", str(folder)], ["predict", str(photo)]],
        "lrcn": [["evaluate", "--data-dir", str(folder)], ["predict", str(photo.parent)]],
        "captioner": [["evaluate", "--data-dir", str(folder)], ["caption", str(photo)]],
    }[kind]
    if kind != "captioner" and backend.is_tensorflow():  # elsewhere export is refused for its backend
        argv.append(["export", "--output", str(tmp_path / "export")])
    return [[a[0], "--model", str(model), *a[1:]] for a in argv]


@pytest.mark.parametrize("script_kind", list(SCRIPTS))
def test_each_command_refuses_a_model_of_another_kind(script_kind, saved_models, tmp_path, caplog):
    descriptions = training.KIND_DESCRIPTIONS
    for model_kind, path in saved_models.items():
        if model_kind == script_kind:
            continue
        for argv in commands(script_kind, path, tmp_path):
            line = error_line(SCRIPTS[script_kind].main, argv, caplog)
            assert f"{path} is {descriptions[model_kind]}, not {descriptions[script_kind]}" in line, (argv, line)
    assert not (tmp_path / "export").exists()


def test_the_python_apis_refuse_a_model_of_another_kind(saved_models):
    loaded = {kind: keras.saving.load_model(path) for kind, path in saved_models.items()}
    image = np.zeros((20, 20, 3), np.uint8)
    with pytest.raises(UsageError, match=r"the model is an LRCN \(lrcn\.py\), not an image classifier"):
        crc.classify(loaded["lrcn"], [image])
    with pytest.raises(UsageError, match=r"is a captioner \(captioning\.py\), not an image classifier"):
        crc.classify(saved_models["captioner"], [image])
    with pytest.raises(UsageError, match=r"the model is an image classifier .*, not an LRCN"):
        lrcn.classify(loaded["classifier"], [np.zeros((2, 20, 20, 3))])
    with pytest.raises(UsageError, match=r"is an LRCN \(lrcn\.py\), not a captioner"):
        cap.caption(saved_models["lrcn"], [image])
    # and each kind is served by its own script
    assert len(crc.classify(saved_models["classifier"], [image], top_k=2)[0]) == 2
    assert len(lrcn.classify(saved_models["lrcn"], [np.zeros((3, 20, 20, 3))], top_k=2)[0]) == 2
    assert all(isinstance(text, str) for text in cap.caption(saved_models["captioner"], [image, image]))


def test_the_python_apis_take_a_single_path_or_array_as_one_input(saved_models, tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (20, 20, 3)).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "one.png")
    for path in (str(tmp_path / "one.png"), tmp_path / "one.png"):
        assert crc.classify(saved_models["classifier"], path, top_k=1) == \
            crc.classify(saved_models["classifier"], [image], top_k=1)
        assert cap.caption(saved_models["captioner"], path) == cap.caption(saved_models["captioner"], [image])
    assert len(crc.classify(saved_models["classifier"], image)) == 1
    assert len(lrcn.classify(saved_models["lrcn"], np.zeros((3, 20, 20, 3), np.uint8))) == 1
    with pytest.raises(UsageError, match=r"input 1 \(dtype float64, shape \(20, 20, 3\)\).*multiply by 255"):
        crc.classify(saved_models["classifier"], [image, image / 255.0])
    with pytest.raises(UsageError, match=r"clip 0, frame 0 \(dtype uint16"):
        lrcn.classify(saved_models["lrcn"], [np.zeros((3, 20, 20, 3), np.uint16)])


def test_a_file_that_is_no_keras_model_is_named(tmp_path, caplog):
    fake = tmp_path / "model.keras"
    fake.write_bytes(b"not a zip")
    assert "is damaged" in error_line(crc.main, ["predict", "--model", str(fake), str(fake)], caplog)


# ---------------------------------------------------------------- samples are whole

def extract(tmp_path, *argv):
    return extract_frames.main([*map(str, argv)])


def test_a_second_extraction_replaces_the_sample_whole(tmp_path):
    video = write_video(tmp_path / "walk.avi", frames=20)
    assert extract(tmp_path, video, "--output", tmp_path / "out", "--label", "walk", "--max-frames", 20) == 0
    assert extract(tmp_path, video, "--output", tmp_path / "out", "--label", "walk", "--max-frames", 5) == 0
    split = sequences.list_sequences(tmp_path / "out")
    assert [len(sample) for sample in split.samples] == [5]
    assert not [p for p in (tmp_path / "out" / "walk").iterdir() if p.name.startswith(".")]  # no leftovers


def test_a_leftover_partial_folder_is_not_a_sample(tmp_path):
    write_jpeg(tmp_path / "out" / "walk" / "v" / "frame_00000.jpg", 0)
    write_jpeg(tmp_path / "out" / "walk" / ".v.partial" / "frame_00000.jpg", 1)  # a kill during a write
    split = sequences.list_sequences(tmp_path / "out")
    assert len(split) == 1 and split.samples[0][0].parent.name == "v"


def test_two_videos_of_one_sample_name_are_refused_with_both_names(tmp_path, caplog):
    first, second = write_video(tmp_path / "a" / "walk.avi"), write_video(tmp_path / "b" / "walk.avi", frames=6)
    with caplog.at_level(logging.ERROR):
        assert extract(tmp_path, first, second, "--output", tmp_path / "out", "--label", "walk") == 1
    assert f"{first} and {second} would both be written to" in caplog.text
    assert not (tmp_path / "out").exists()  # refused before any work
    # the same across two calls: the folder records its video
    assert extract(tmp_path, first, "--output", tmp_path / "out", "--label", "walk") == 0
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert extract(tmp_path, second, "--output", tmp_path / "out", "--label", "walk") == 1
    assert f"holds the frames of {first.resolve()}, not of {second.resolve()}" in caplog.text
    assert len(sequences.list_sequences(tmp_path / "out").samples[0]) == 12  # the first video's, intact


def test_class_folders_of_videos_refuse_collisions_and_a_stale_split(tmp_path, caplog):
    for clip in ("v_Walk_g01_c01.avi", "v_Walk_g02_c01.avi", "v_Walk_g03_c01.avi", "v_Walk_g04_c01.avi"):
        write_video(tmp_path / "videos" / "walk" / clip)
    write_video(tmp_path / "videos" / "walk" / "v_Walk_g01_c01.mp4")  # the same sample name
    with caplog.at_level(logging.ERROR):
        assert extract(tmp_path, tmp_path / "videos", "--output", tmp_path / "out") == 1
    assert "v_Walk_g01_c01.avi and " in caplog.text and "v_Walk_g01_c01.mp4 would both be written" in caplog.text
    (tmp_path / "videos" / "walk" / "v_Walk_g01_c01.mp4").unlink()
    assert extract(tmp_path, tmp_path / "videos", "--output", tmp_path / "out", "--test-fraction", "0.25") == 0
    assert extract(tmp_path, tmp_path / "videos", "--output", tmp_path / "out", "--test-fraction", "0.25") == 0
    caplog.clear()
    with caplog.at_level(logging.ERROR):  # other fractions: a clip could end up in two splits
        assert extract(tmp_path, tmp_path / "videos", "--output", tmp_path / "out", "--test-fraction", "0.5") == 1
    assert "sample folders this extraction would not write" in caplog.text


@pytest.mark.parametrize("flag, value, message", [
    ("--size", "-5", "--size must be >= 1. Received: -5"), ("--fps", "0", "--fps must be > 0"),
    ("--max-frames", "0", "--max-frames must be >= 1"), ("--fps", "nan", "--fps must be > 0"),
])
def test_extraction_flags_are_checked_before_work(flag, value, message, tmp_path, capsys):
    video = write_video(tmp_path / "walk.avi")
    with pytest.raises(SystemExit) as exit_:
        extract(tmp_path, video, "--output", tmp_path / "out", "--label", "walk", flag, value)
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- one image reader

def write_exif_rotated(path, upright):
    """Saves ``upright`` (H, W, 3) uint8 stored sideways with EXIF orientation 6 (rotate 90 clockwise
    to view), as a phone does; returns the path."""
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # what the sensor wrote
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(path, exif=exif, quality=95)
    return path


def test_exif_orientation_is_applied_by_every_reader(tmp_path):
    upright = np.zeros((24, 16, 3), np.uint8)
    upright[:8] = (255, 0, 0)  # red top third: 24 rows, 16 columns
    path = write_exif_rotated(tmp_path / "photo.jpg", upright)
    read = data.read_rgb(path)
    assert read.shape == (24, 16, 3) and read[:6, :, 0].mean() > 200 and read[-6:, :, 0].mean() < 60
    square = data.read_rgb(path, 71)
    np.testing.assert_array_equal(data.rgb_array(path, 71), square)  # classify(), caption()
    np.testing.assert_array_equal(features.ImageBatches([path], 71, 1)[0][0], square)  # caches, encoders
    if backend.is_tensorflow():  # the tf.data paths
        np.testing.assert_array_equal(features.tf_read_rgb(str(path), 71).numpy(), square)
    folders = tmp_path / "data" / "train" / "a"
    folders.mkdir(parents=True)
    write_exif_rotated(folders / "photo.jpg", upright)
    split = data.list_split(tmp_path / "data" / "train")
    generator = crc.flow_from_split(split, 71, 1, shuffle=False)[0][0][0]
    np.testing.assert_allclose(generator, keras.applications.xception.preprocess_input(square.copy()), atol=1e-6)


def write_16_bit(path):
    Image.fromarray(np.full((16, 16), 30000, np.uint16)).save(path)
    assert Image.open(path).mode.startswith("I")
    return path


def test_a_16_bit_image_is_refused_by_every_reader(tmp_path, saved_models):
    path = write_16_bit(tmp_path / "gray16.png")
    for read in (lambda: crc.classify(saved_models["classifier"], [path]), lambda: data.check_images([path]),
                 lambda: data.read_rgb(path, 71), lambda: cap.caption(saved_models["captioner"], [path])):
        with pytest.raises(DatasetError, match=r"gray16\.png'?: a I;16 \(16-bit\) image; convert it"):
            read()


def test_tiff_and_ppm_are_read_by_the_caption_command(tmp_path, saved_models, capsys):
    rng = np.random.default_rng(0)
    paths = []
    for suffix in ("tiff", "ppm"):
        paths.append(tmp_path / f"photo.{suffix}")
        Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(paths[-1])
    assert cap.main(["caption", "--model", str(saved_models["captioner"]), *map(str, paths)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in printed] == list(map(str, paths))
    assert [line.split(": ", 1)[1] for line in printed] == cap.caption(saved_models["captioner"], paths)


# ---------------------------------------------------------------- splits that do not leak

@pytest.fixture
def flickr(tmp_path):
    return make_flickr8k(tmp_path / "flickr8k", counts=(4, 2, 2))


def test_an_image_in_two_splits_is_refused_with_both_places(flickr):
    train = flickr / captions.FLICKR8K_SPLITS["train"]
    test = flickr / captions.FLICKR8K_SPLITS["test"]
    leaked = train.read_text().split()[1]
    test.write_text(test.read_text() + leaked + "\n")
    with pytest.raises(DatasetError, match=rf"{leaked} is listed in the train and the test splits: {train}:2 and "
                                           rf"{test}:3"):
        captions.load_caption_splits(flickr)


def test_an_image_listed_twice_is_refused(flickr):
    val = flickr / captions.FLICKR8K_SPLITS["val"]
    first = val.read_text().split()[0]
    val.write_text(val.read_text() + first + "\n")
    with pytest.raises(DatasetError, match=rf"{first} is listed twice in the val split: {val}:1 and {val}:3"):
        captions.load_caption_splits(flickr)


def test_a_caption_without_words_is_named_with_its_line(flickr):
    tokens = flickr / captions.FLICKR8K_TOKENS
    lines = tokens.read_text().splitlines()
    lines[6] = lines[6].split("\t")[0] + "\t. , !"
    tokens.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=rf"{tokens}:7: the caption '. , !' has no word"):
        captions.load_caption_splits(flickr)


@pytest.mark.parametrize("caption, kind", [(42, "int"), (["a", "red", "picture"], "list"), ("?!", None)])
def test_a_coco_caption_that_is_not_text_is_named(tmp_path, caption, kind):
    from tests.conftest import make_coco

    root = make_coco(tmp_path / "coco")
    path = root / "annotations" / "captions_val2017.json"
    content = json.loads(path.read_text())
    content["annotations"][4]["caption"] = caption
    path.write_text(json.dumps(content))
    expected = f"the caption is a {kind}" if kind else r"the caption '\?!' has no word"
    with pytest.raises(DatasetError, match=rf"captions_val2017\.json: annotations\[4\]: {expected}"):
        captions.load_caption_splits(root)


# ---------------------------------------------------------------- flags judged before work, in the user's words

CAPTION_FLAGS = ["--weights", "none", "--image-size", "71", "--embedding-dim", "8", "--lstm-units", "8",
                 "--min-word-count", "1", "--max-length", "6", "--batch-size", "8", "--fine-tune-batch-size", "4",
                 "--epochs", "1", "--fine-tune-epochs", "0", "--skip-image-check"]


@pytest.mark.parametrize("flags, message", [
    (["--max-length", "1000000000"], "--max-length must be in [1, 200] words per caption. Received: --max-length "
                                     "1000000000"),
    (["--min-word-count", "1000"], "--min-word-count 1000 keeps no word"),
    (["--embedding-dim", "0"], "Received: --embedding-dim 0"),
    (["--self-critical-batch-size", "0"],
     "--self-critical-batch-size must be >= 1. Received: --self-critical-batch-size 0"),
    (["--self-critical-samples", "5000"],
     "--self-critical-samples must be in [2, 64]. Received: --self-critical-samples 5000"),
    (["--self-critical-learning-rate", "nan"], "--self-critical-learning-rate must be a positive number."),
    (["--decoder", "attention", "--inject", "merge"],
     "--inject is show-and-tell's choice; the attention decoder reads the image at every word. "
     "Received: --decoder attention --inject merge"),
])
def test_caption_flags_are_refused_before_any_file_in_their_words(flickr, tmp_path, caplog, flags, message):
    out = tmp_path / "run"
    line = error_line(cap.main, ["--data-dir", str(flickr), "--output-dir", str(out), *CAPTION_FLAGS, *flags], caplog)
    assert message in line and "vocabulary_size" not in line
    assert not out.exists()


@pytest.mark.usefixtures("stand_in_backbones")  # about the training core, not Xception
def test_steps_per_epoch_beyond_the_data_is_capped_and_said(tmp_path, caplog):
    folder = make_class_folders(tmp_path / "data", per_class=(4, 1, 1))  # 12 images: 3 batches of 4
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING):
        assert crc.main(["--data-dir", str(folder), "--output-dir", str(out), "--weights", "none", "--image-size",
                         "71", "--rnn-timesteps", "71", "--rnn-units", "8", "--batch-size", "4", "--epochs", "2",
                         "--fine-tune-epochs", "0", "--steps-per-epoch", "12", "--lr-schedule", "cosine"]) == 0
    assert "--steps-per-epoch 12 is more than the 3 batches of the training data; each epoch runs 3" in caplog.text
    history = rundir.read_history(out / "phase1_log.csv")
    assert history["learning_rate"][-1] == pytest.approx(0.0, abs=1e-9)  # the schedule ends where the phase ends


def test_output_paths_that_cannot_be_written_are_refused_before_the_model_loads(saved_models, tmp_path, caplog,
                                                                              monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    folder = make_class_folders(tmp_path / "data", per_class=(2, 1, 1))
    monkeypatch.setattr(training, "load_checkpoint", lambda *a: pytest.fail("the model loaded first"))
    model = str(saved_models["classifier"])
    line = error_line(crc.main, ["evaluate", "--model", model, "--data-dir", str(folder), "--json",
                                 str(blocker / "m.json")], caplog)
    assert line == f"--json {blocker / 'm.json'} cannot be written: {blocker} is a file, not a folder."
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    for script in (crc, lrcn) if backend.is_tensorflow() else ():  # elsewhere export is refused for its backend
        line = error_line(script.main, ["export", "--model", model, "--output", str(tmp_path / "full")], caplog)
        assert "--output" in line and "already exists and is not an empty folder" in line


# ---------------------------------------------------------------- quiet errors

def test_a_weights_file_of_another_architecture_gives_one_line_without_warnings(tmp_path):
    other = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    other.save_weights(tmp_path / "other.weights.h5")
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        with pytest.raises(WeightsUnavailableError, match=r"Could not load Xception no-top weights from .*other"):
            pretrained_backbone(keras.applications.Xception, str(tmp_path / "other.weights.h5"),
                                input_shape=(71, 71, 3), pooling="avg")
    assert not shown, [str(w.message)[:100] for w in shown]


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, where os.access says yes to root")
@pytest.mark.backend_independent
def test_output_paths_are_probed_by_writing_a_file(tmp_path):
    for path, folder in (("/proc/x.json", False), ("/proc/xmaps", True)):
        with pytest.raises(UsageError, match=f"{path} cannot be written: a file cannot be created in /proc"):
            rundir.check_writable(path, "--json", folder=folder)
    rundir.check_writable(tmp_path / "new" / "x.json", "--json")  # a folder still to create is fine
    assert list(tmp_path.iterdir()) == []  # the probe is gone, and nothing was created
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "a.csv").write_text("a")
    rundir.check_writable(tmp_path / "full", "--output", folder=True, empty=False)
    with pytest.raises(UsageError, match="is not an empty folder"):
        rundir.check_writable(tmp_path / "full", "--output", folder=True)
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["a.csv"]


@pytest.mark.backend_independent
@pytest.mark.parametrize("array, message", [
    (np.full((71, 71, 3), 257 * 200, np.uint16), r"input 2 \(dtype uint16, shape \(71, 71, 3\)\).*divide by 257"),
    (np.full((8, 8, 3), 0.5, np.float32), r"input 2 \(dtype float32, shape \(8, 8, 3\)\).*multiply by 255"),
    (np.zeros((0, 0, 3), np.uint8), r"shape \(0, 0, 3\)\): an image array must be a non-empty"),
    (np.full((8, 8, 3), np.nan, np.float32), "holds NaN or infinite values"),
    (np.full((8, 8, 3), np.inf, np.float64), "holds NaN or infinite values"),
    (np.full((8, 8, 3), -3.0), r"values from -3 to -3; RGB 0..255"),
    (np.full((8, 8, 3), 300.0), r"values from 300 to 300; RGB 0..255"),
    (np.ones((8, 8, 3), bool), r"dtype bool.*uint8 RGB or float RGB in 0..255"),
    (np.ones((8, 8, 3), complex), r"dtype complex128"),
    (np.array([[object()]]), r"dtype object"),
    (np.full((8, 8, 3), 7, np.int64), r"dtype int64.*convert it to uint8"),
    (np.zeros((8, 8, 5), np.uint8), r"shape \(8, 8, 5\)"),
])
def test_image_arrays_outside_the_contract_are_refused_by_index(array, message):
    with pytest.raises(UsageError, match=message) as error:
        data.rgb_array(array, 71, "input 2")
    assert "\n" not in str(error.value)


@pytest.mark.backend_independent
def test_image_arrays_inside_the_contract_are_read_as_files_are(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (9, 9, 3)).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "x.png")
    from_file = data.rgb_array(tmp_path / "x.png", 5)
    np.testing.assert_array_equal(data.rgb_array(rgb, 5), from_file)
    np.testing.assert_array_equal(data.rgb_array(rgb.astype(np.float32), 5), from_file)  # float 0..255
    rgba = np.concatenate([rgb, np.full((9, 9, 1), 128, np.uint8)], axis=-1)
    np.testing.assert_array_equal(data.rgb_array(rgba, 5), from_file)  # alpha dropped, as PIL's convert("RGB")
    gray = rgb[..., 0]
    np.testing.assert_array_equal(data.rgb_array(gray, 9), np.repeat(gray[..., None], 3, -1).astype(np.float32))
    np.testing.assert_array_equal(data.rgb_array(np.zeros((4, 4, 3), np.float32), 4), 0)  # black is fine
    assert data.as_inputs(str(tmp_path / "x.png")) == [str(tmp_path / "x.png")]  # not its characters
    assert len(data.as_inputs(rgb)) == 1 and len(data.as_inputs(np.stack([rgb, rgb]))) == 2


@pytest.mark.backend_independent
def test_a_truncated_image_is_named_by_every_reader(tmp_path):
    """With --skip-image-check nothing decodes the files first: the feature caches' reader names the file."""
    path = write_jpeg(tmp_path / "cut.jpg", seed=0, size=64)
    path.write_bytes(path.read_bytes()[:300])
    for read in (lambda: features.ImageBatches([path], 32, 1)[0], lambda: data.read_rgb(path, 32),
                 lambda: sequences.load_frames([path], 32)):
        with pytest.raises(DatasetError, match=r"cut.jpg' cannot be decoded as an image \(OSError"):
            read()


@pytest.mark.backend_independent
@pytest.mark.skipif(importlib.util.find_spec("torch") is not None, reason="needs a backend that is not installed")
def test_a_backend_that_is_not_installed_is_one_line_saying_what_to_set(tmp_path):
    (tmp_path / "keras.json").write_text('{"backend": "torch"}')
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    for extra, source in (({"KERAS_BACKEND": "torch"}, "KERAS_BACKEND"), ({"KERAS_HOME": str(tmp_path)}, "keras.json")):
        result = subprocess.run([sys.executable, "lrcn.py", "--data-dir", str(tmp_path), "--frames", "2"], cwd=root,
                                capture_output=True, text=True, timeout=60, env={**env, **extra})
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1 and len(lines) == 1, result.stderr
        assert lines[0].startswith("error: the Keras backend torch (") and source in lines[0]
        assert re.search(r"is not installed; (set KERAS_BACKEND=(jax|tensorflow)|install one)", lines[0])


# ---------------------------------------------------------------- the same image twice

def test_the_same_photo_in_two_splits_is_refused_whatever_its_name_or_format(tmp_path, caplog):
    root = make_class_folders(tmp_path / "data")
    photo = root / "train" / "cat" / "cat_0.jpg"
    Image.open(photo).convert("RGB").save(root / "train" / "dog" / "again.png")  # same pixels, other format
    shutil.copyfile(photo, root / "test" / "fox" / "copy_of_train.jpg")
    groups = [(name, data.list_split(root / name).paths) for name in ("train", "val", "test")]
    with pytest.raises(DatasetError, match=r"the same image is in two splits: .*cat_0.jpg \(train\) and "
                                           r".*copy_of_train.jpg \(test\); .*--allow-duplicates") as error:
        data.check_splits(groups)
    assert "\n" not in str(error.value)
    with pytest.raises(DatasetError, match="copy_of_train.jpg"):  # without decoding: the files' bytes
        data.check_splits(groups, skip_check=True)
    with caplog.at_level(logging.WARNING):
        data.check_splits(groups, allow_duplicates=True)
    assert "1 image repeated inside one split: " in caplog.text and "again.png (train)" in caplog.text
    assert "1 image repeated in two splits (--allow-duplicates)" in caplog.text
    out = tmp_path / "run"
    line = error_line(crc.main, ["--data-dir", str(root), "--output-dir", str(out), "--weights", "none",
                                 "--image-size", "71", "--rnn-timesteps", "71", "--rnn-units", "8"], caplog)
    assert "copy_of_train.jpg (test)" in line
    assert not (out / "phase1_log.csv").exists()


def test_the_same_photo_in_caption_splits_is_refused(tmp_path, caplog):
    from tests.conftest import make_coco

    root = make_coco(tmp_path / "coco", with_test=True)
    shutil.copyfile(root / "train2017" / "000000000001.jpg", root / "test2017" / "000000000002.jpg")
    splits = captions.load_caption_splits(root)
    with pytest.raises(DatasetError, match=r"000000000001.jpg \(train\) and .*test2017.000000000002.jpg \(test\)"):
        data.check_splits([(name, split.paths) for name, split in splits.items()])


def test_the_same_clip_in_two_splits_is_refused_and_frames_alone_are_not(tmp_path):
    from tests.conftest import make_clips

    root = tmp_path / "clips"
    make_clips(root / "train", lengths=(3, 4))
    make_clips(root / "test", lengths=(5,))
    black = np.zeros((12, 12, 3), np.uint8)  # the same opening frame in a train and a test clip: not a repeat
    for clip in (root / "train" / "a" / "s0", root / "test" / "b" / "s0"):
        Image.fromarray(black).save(clip / "frame_0.jpg")
    splits = {name: sequences.list_sequences(root / name) for name in ("train", "test")}
    sequences.check_splits(splits)
    shutil.copytree(root / "train" / "a" / "s1", root / "test" / "a" / "renamed")
    splits["test"] = sequences.list_sequences(root / "test")
    with pytest.raises(DatasetError, match=r"the same clip is in two splits: .*train.a.s1 \(train\) and "
                                           r".*test.a.renamed \(test\)"):
        sequences.check_splits(splits)


@pytest.mark.backend_independent
def test_a_folder_of_inputs_counts_the_files_it_skips(tmp_path, caplog):
    write_jpeg(tmp_path / "in" / "a.jpg", seed=0)
    (tmp_path / "in" / "b.gif").write_bytes(b"GIF89a")
    (tmp_path / "in" / "c.webp").write_bytes(b"RIFF")
    with caplog.at_level(logging.WARNING):
        assert data.image_files([tmp_path / "in"]) == [tmp_path / "in" / "a.jpg"]
    assert "2 files skipped, not of the image formats read" in caplog.text


@pytest.mark.backend_independent
def test_wide_images_get_the_conversion_their_mode_needs(tmp_path):
    Image.fromarray(np.full((8, 8), 3.5, np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(DatasetError, match=r"a F \(32-bit\) image; .*scale its values to 0..255") as error:
        data.read_rgb(tmp_path / "f.tif")
    assert "257" not in str(error.value)
    Image.fromarray(np.full((8, 8), 30000, np.uint16)).save(tmp_path / "w.png")
    with pytest.raises(DatasetError, match=r"v / 257"):
        data.read_rgb(tmp_path / "w.png")


@pytest.mark.backend_independent
def test_a_coco_image_without_captions_is_left_out_with_a_line(tmp_path, caplog):
    from tests.conftest import make_coco

    root = make_coco(tmp_path / "coco")
    listing = root / "annotations" / "captions_train2017.json"
    content = json.loads(listing.read_text())
    content["annotations"] = [a for a in content["annotations"] if a["image_id"] != 2]
    listing.write_text(json.dumps(content))
    with caplog.at_level(logging.WARNING):
        splits = captions.load_caption_splits(root)
    assert len(splits["train"].paths) == 5
    assert "captions_train2017.json: 1 images without a caption left out (000000000002.jpg)" in caplog.text


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, where os.access says yes to root")
@pytest.mark.backend_independent
def test_the_tools_probe_their_output_before_reading_anything(tmp_path, capsys, caplog):
    from helpers import restructure_dataset, ucf101_features

    assert restructure_dataset.main([str(tmp_path), "--output", "/proc/out"]) == 2
    assert ucf101_features.main([str(tmp_path), "--output", "/proc/out"]) == 2  # the source is judged first
    (tmp_path / "annos").mkdir()
    for name in ("videos_labels_subsets.txt", "actions.txt"):
        (tmp_path / "annos" / name).write_text("")
    assert ucf101_features.main([str(tmp_path), "--output", "/proc/out"]) == 2
    assert "--output /proc/out cannot be written: a file cannot be created in /proc" in capsys.readouterr().err
    video = write_video(tmp_path / "v.avi")
    with caplog.at_level(logging.ERROR):
        assert extract_frames.main([str(video), "--label", "a", "--output", "/proc/out"]) == 1
    assert "--output /proc/out cannot be written" in caplog.text


def test_a_bad_caption_of_another_split_does_not_stop_evaluating_this_one(flickr):
    tokens = flickr / captions.FLICKR8K_TOKENS
    train_image = (flickr / captions.FLICKR8K_SPLITS["train"]).read_text().split()[0]
    lines = [line if not line.startswith(f"{train_image}#0") else f"{train_image}#0\t " for line in
             tokens.read_text().splitlines()]
    tokens.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match="has no word"):
        captions.load_caption_splits(flickr)  # training reads every split
    test = captions.load_caption_splits(flickr, only=("test",))
    listed = (flickr / captions.FLICKR8K_SPLITS["test"]).read_text().split()
    assert list(test) == ["test"] and len(test["test"].paths) == len(listed)


@pytest.mark.backend_independent
def test_an_attention_map_of_a_1_x_5000_photo_is_not_blank(tmp_path):
    from helpers import reports

    Image.fromarray(np.random.default_rng(0).integers(0, 256, (1, 5000, 3), dtype=np.uint8)).save(tmp_path / "w.png")
    reports.plot_attention(tmp_path / "w.png", ["a", "b", "c", "d"], np.full((4, 100), 0.01), (10, 10),
                           tmp_path / "map.png", columns=5)
    with Image.open(tmp_path / "map.png") as picture:
        pixels = np.asarray(picture.convert("RGB"))
    assert (pixels.min(axis=-1) < 240).mean() > 0.3  # the panels are painted, not white


@pytest.mark.tensorflow
def test_tensorflow_warnings_are_printed_once(tmp_path):
    script = ("import logging\nimport tensorflow as tf\nfrom helpers import cli\ntf.get_logger()\n"
              "cli.configure_logging()\ntf.get_logger().warning('5 out of the last 5 calls triggered tf.function "
              "retracing')\n")
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(root)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stderr.count("triggered tf.function retracing") == 1, result.stderr
