import json
import logging
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

import lrcn
from helpers import extract_frames, rundir, sequences, training
from helpers.data import DatasetError
from helpers.errors import UsageError
from helpers.layers import PAD_VALUE
from tests.conftest import Killed, kill_at_batch, make_clips, weights_never_drawn, write_video

TINY = dict(image_size=32, dense_units=16, gru_units=8, weights=None)
TINY_FLAGS = ["--weights", "none", "--image-size", "32", "--dense-units", "16", "--gru-units", "8",
              "--batch-size", "2", "--fine-tune-batch-size", "2", "--workers", "1"]


@pytest.fixture
def clips(tmp_path):
    for split, lengths in (("train", (3, 5, 4, 6)), ("val", (4, 2)), ("test", (5, 3))):
        make_clips(tmp_path / "data" / split, lengths=lengths)
    return tmp_path / "data"


# ---------------------------------------------------------------- model

@pytest.mark.parametrize("recipe", ["seed", "small-data"])
def test_seed_shapes_fixed_and_variable(recipe):
    with weights_never_drawn():  # shapes and initializers only, of 75 million weights
        fixed = lrcn.build_lrcn(5, frames=16, weights=None, recipe=recipe)
    assert fixed.input_shape == (None, 16, 224, 224, 3) and fixed.output_shape == (None, 5)
    assert fixed.get_layer("per_frame_cnn").output.shape == (None, 16, 7 * 7 * 512)  # VGG16's flattened map
    head = fixed.get_layer("lrcn_head")
    assert head.get_layer("frame_dense").output.shape == (None, 16, 2048)
    assert head.get_layer("gru").output.shape == (None, 1024)
    names = {layer.name for layer in head.layers}
    gru = head.get_layer("gru")
    if recipe == "seed":  # the seed's head: linear Dense on raw features, dropouts 0.5, GRU bias ones
        assert "feature_norm" not in names and head.get_layer("frame_dense").activation is keras.activations.linear
        assert gru.cell.dropout == gru.cell.recurrent_dropout == 0.5
        assert isinstance(gru.cell.bias_initializer, keras.initializers.Ones)
    else:
        assert "feature_norm" in names and head.get_layer("frame_dense").activation is keras.activations.relu
        assert gru.cell.dropout == 0.2 and gru.cell.recurrent_dropout == 0.0
        assert isinstance(gru.cell.bias_initializer, keras.initializers.Zeros)


@pytest.mark.usefixtures("stand_in_backbones")  # the frame folding and the per-frame head, not VGG16
def test_variable_length_per_frame_shapes():
    variable = lrcn.build_lrcn(3, frames=None, per_frame=True, **TINY)
    assert variable.input_shape == (None, None, 32, 32, 3) and variable.output_shape == (None, None, 3)
    for frames in (1, 4):
        assert variable.predict(np.zeros((2, frames, 32, 32, 3), "float32"), verbose=0).shape == (2, frames, 3)


def test_frozen_and_trainable_vgg16_layers():
    model = lrcn.build_lrcn(3, frames=2, fine_tune_layers=5, **TINY)
    vgg = training.find_layer(model, "vgg16")
    assert len(vgg.layers) == lrcn.VGG16.layers
    training.set_backbone_trainable(model, "vgg16", False)
    assert len(vgg.trainable_weights) == 0
    training.set_backbone_trainable(model, "vgg16", True, top_layers=5)
    trainable = [layer.name for layer in vgg.layers if layer.trainable and layer.weights]
    assert trainable == ["block5_conv1", "block5_conv2", "block5_conv3"]
    assert len(vgg.trainable_weights) == 6 and len(vgg.non_trainable_weights) == 20


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(image_size=16), r"image_size must be at least 32.*Received: image_size=16"),
        (dict(fine_tune_layers=20), r"fine_tune_layers must be in \[0, 19\].*Received: fine_tune_layers=20"),
        (dict(fine_tune_layers=-1), r"Received: fine_tune_layers=-1"),
        (dict(num_classes=1), r"num_classes must be at least 2.*Received: num_classes=1"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lrcn.build_lrcn(**{"num_classes": 3, **TINY, **kwargs})


def test_vgg16_preprocessing_inside_model():
    x = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype("float32")
    expected = keras.applications.vgg16.preprocess_input(x.copy())
    got = keras.ops.convert_to_numpy(lrcn.VGG16Preprocess()(x))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.usefixtures("stand_in_backbones")  # the frame folding and masking, not VGG16
def test_per_frame_features_correct_after_another_length():
    """Catches the TimeDistributed bug: a new frame count after another was traced."""
    model = lrcn.build_lrcn(3, frames=None, **TINY)
    encoder = training.find_layer(model, "frame_backbone")
    features = keras.Model(model.input, model.get_layer("per_frame_cnn").output)
    rng = np.random.default_rng(1)
    features.predict(rng.uniform(0, 255, (1, 7, 32, 32, 3)).astype("float32"), verbose=0)
    for shape in ((1, 4), (2, 5), (3, 2)):
        x = rng.uniform(0, 255, shape + (32, 32, 3)).astype("float32")
        got = features.predict(x, verbose=0)
        frame_by_frame = np.stack([encoder.predict(x[:, t], verbose=0) for t in range(shape[1])], axis=1)
        assert got.shape == shape + (512,)
        np.testing.assert_allclose(got, frame_by_frame, rtol=1e-4, atol=1e-4)


@pytest.mark.usefixtures("stand_in_backbones")  # the frame folding and masking, not VGG16
def test_padded_sample_predicts_as_alone():
    model = lrcn.build_lrcn(3, frames=None, **TINY)
    rng = np.random.default_rng(2)
    short = rng.uniform(0, 255, (1, 3, 32, 32, 3)).astype("float32")
    long = rng.uniform(0, 255, (1, 6, 32, 32, 3)).astype("float32")
    padded = np.full((2, 6, 32, 32, 3), PAD_VALUE, "float32")
    padded[0, :3], padded[1] = short[0], long[0]
    together = model.predict(padded, verbose=0)
    np.testing.assert_allclose(together[0], model.predict(short, verbose=0)[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(together[1], model.predict(long, verbose=0)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.usefixtures("stand_in_backbones")  # the frame folding and masking, not VGG16
def test_safe_mode_round_trip(tmp_path):
    model = lrcn.build_lrcn(3, frames=None, **TINY)
    x = np.random.default_rng(3).uniform(0, 255, (1, 4, 32, 32, 3)).astype("float32")
    model.save(tmp_path / "lrcn.keras")
    loaded = keras.saving.load_model(tmp_path / "lrcn.keras", safe_mode=True)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- data

def test_natural_sort():
    names = ["frame_10.jpg", "frame_2.jpg", "frame_1.jpg", "Frame_3.jpg"]
    assert sorted(names, key=sequences.natural_key) == ["frame_1.jpg", "frame_2.jpg", "Frame_3.jpg", "frame_10.jpg"]


@pytest.mark.parametrize(
    "length, frames, expected",
    [
        (3, 6, [0, 0, 1, 1, 2, 2]),       # short: each frame held evenly, order kept
        (5, 5, [0, 1, 2, 3, 4]),          # exact
        (10, 4, [0, 3, 6, 9]),            # long: spread over the whole sequence, ends included
        (1, 3, [0, 0, 0]),
    ],
)
def test_sampler(length, frames, expected):
    assert sequences.sample_indices(length, frames).tolist() == expected


def test_both_layouts(tmp_path):
    folders = sequences.list_sequences(make_clips(tmp_path / "c"))
    seed = sequences.list_sequences(make_clips(tmp_path / "s", layout="seed"))
    assert folders.layout == "class_folders" and seed.layout == "seed"
    assert folders.class_names == ["a", "b"] and seed.class_names == ["1", "2"]
    assert folders.labels == seed.labels == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [len(s) for s in folders.samples] == [len(s) for s in seed.samples] == [3, 5, 4, 6] * 2
    assert [p.name for p in seed.samples[3]] == [f"frame_{t}.jpg" for t in range(6)]


def test_batches_fixed_bucketed_and_single(tmp_path):
    split = sequences.list_sequences(make_clips(tmp_path / "c"))
    fixed = sequences.FrameSequences(split, 12, batch_size=3, frames=4)
    x, y = fixed[0]
    assert x.shape == (3, 4, 12, 12, 3) and y.shape == (3, 2) and 0 <= x.min() and x.max() <= 255
    bucketed = sequences.FrameSequences(split, 12, batch_size=2, frames=None)
    lengths = [[len(split.samples[i]) for i in batch] for batch in bucketed.batches]
    assert lengths == [[3, 3], [4, 4], [5, 5], [6, 6]]  # bucketing: equal lengths share a batch
    single = sequences.FrameSequences(split, 12, batch_size=1, frames=None)
    assert [single[i][0].shape[1] for i in range(len(single))] == [3, 5, 4, 6, 3, 5, 4, 6]
    mixed = sequences.FrameSequences(split, 12, batch_size=8, frames=None)
    x, _ = mixed[0]
    assert x.shape[1] == 6 and (x[0, 3:] == PAD_VALUE).all() and (x[0, :3] >= 0).all()
    # lengths rounded up to a multiple (a few shapes: JAX compiles per shape), at any batch size
    rounded = sequences.FrameSequences(split, 12, batch_size=2, frames=None, length_multiple=4)
    assert [rounded[i][0].shape[1] for i in range(len(rounded))] == [4, 4, 8, 8]
    x, _ = rounded[2]
    assert (x[:, 5:] == PAD_VALUE).all() and (x[:, :5] >= 0).all()
    assert sequences.FrameSequences(split, 12, batch_size=1, frames=4, length_multiple=8)[0][0].shape[1] == 4
    with pytest.raises(UsageError, match="length_multiple must be at least 1. Received: length_multiple=0"):
        sequences.FrameSequences(split, 12, batch_size=1, length_multiple=0)


def test_bad_sequence_inputs(tmp_path):
    make_clips(tmp_path / "c")
    (tmp_path / "c" / "a" / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"empty: no frames"):
        sequences.list_sequences(tmp_path / "c")
    clip = make_clips(tmp_path / "d") / "a" / "s0" / "frame_1.jpg"
    clip.write_bytes(clip.read_bytes()[:100])
    with pytest.raises(DatasetError, match=r"frame_1.jpg"):
        sequences.check_sequences(sequences.list_sequences(tmp_path / "d"))


# ---------------------------------------------------------------- videos

def test_extract_frames_from_real_video(tmp_path):
    video = write_video(tmp_path / "clip.avi")
    frames = extract_frames.read_video(video)
    assert frames.shape == (12, 32, 40, 3)
    assert frames[0, :, 0:3, 0].mean() > 150 and frames[0, :, 0:3, 2].mean() < 80  # RGB order: red
    assert np.argmax(frames[5, 16, :, 0]) in (15, 16, 17)
    assert extract_frames.read_video(video, fps=5).shape[0] == 6
    assert extract_frames.read_video(video, max_frames=4, size=16).shape == (4, 16, 16, 3)
    assert extract_frames.main([str(video), "--output", str(tmp_path / "out"), "--layout", "seed", "--label", "2",
                                "--max-frames", "5"]) == 0
    written = sequences.frame_files(tmp_path / "out" / "2_clip")
    assert [p.name for p in written] == [f"frame_{t:05d}.jpg" for t in range(5)]


@pytest.mark.skipif(not Path("/usr/share/doc/opencv-doc/examples/data/vtest.avi").is_file(),
                    reason="needs Debian's opencv-doc")
def test_extract_frames_from_shipped_video():
    frames = extract_frames.read_video("/usr/share/doc/opencv-doc/examples/data/vtest.avi", max_frames=10, size=64)
    assert frames.shape == (10, 64, 64, 3) and frames.std() > 10


def test_missing_and_unreadable_video(tmp_path):
    with pytest.raises(extract_frames.VideoError, match="nope.mp4 does not exist"):
        extract_frames.read_video(tmp_path / "nope.mp4")
    (tmp_path / "junk.mp4").write_bytes(b"not a video at all")
    with pytest.raises(extract_frames.VideoError, match="junk.mp4"):
        extract_frames.read_video(tmp_path / "junk.mp4")
    assert extract_frames.main([str(tmp_path / "nope.mp4"), "--output", str(tmp_path / "o"), "--label", "x"]) == 1


# ---------------------------------------------------------------- end to end

PROMISED = ["args.json", "classes.json", "metrics.json", "phase1_best.keras", "phase2_best.keras",
            "phase1_log.csv", "phase2_log.csv", "phase1_curves.png", "phase2_curves.png", "confusion_matrix.png"]


@pytest.mark.usefixtures("stand_in_backbones")  # the run, not VGG16 (whose training: test_precision.py)
@pytest.mark.parametrize("length_flags", [["--frames", "3"], ["--variable-length"]])
@pytest.mark.heavy
def test_short_run_writes_every_output(clips, tmp_path, capsys, caplog, length_flags):
    """The default recipe (small-data), both phases, then ``predict``; at a fixed length phase 1
    trains on cached features (the other recipe and the cache flag: the test below)."""
    out = tmp_path / "run"
    args = ["--data-dir", str(clips), "--output-dir", str(out), *length_flags, *TINY_FLAGS,
            "--epochs", "1", "--fine-tune-epochs", "1", "--fine-tune-layers", "2"]
    with caplog.at_level(logging.INFO):
        assert lrcn.main(args) == 0
    for name in PROMISED:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert json.loads((out / "args.json").read_text())["learning_rate"] == lrcn.RECIPES["small-data"]["learning_rate"]
    cached = "--frames" in length_flags
    assert ("head trains on cached VGG16 features" in caplog.text) == cached
    assert len(list((out / "features").glob("*.npy"))) == (2 if cached else 0)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["num_images"] == 4
    assert "top5" not in metrics and set(metrics["per_class_accuracy"]) == {"a", "b"}
    assert "frames shuffled" in capsys.readouterr().out
    one, two = (keras.saving.load_model(out / f"phase{i}_best.keras") for i in (1, 2))
    shuffled = lrcn.evaluate_lrcn(two, sequences.list_sequences(clips / "test"), 2, workers=1, shuffle_frames=True)
    assert metrics["shuffled_frames_top1"] == pytest.approx(shuffled["top1"])
    assert "feature_norm" in {layer.name for layer in one.get_layer("lrcn_head").layers}  # the recipe's head
    # phase 2 changed the top of the backbone but not its first layer
    get = lambda m, n: training.find_layer(m, n).get_weights()[0]  # noqa: E731
    assert not np.allclose(get(one, "block2_conv1"), get(two, "block2_conv1"))
    np.testing.assert_array_equal(get(one, "block1_conv1"), get(two, "block1_conv1"))

    capsys.readouterr()
    video = write_video(tmp_path / "v.avi")
    assert lrcn.main(["predict", "--model", str(out / "phase2_best.keras"), "--top-k", "1",
                      str(clips / "test" / "a" / "s0"), str(video)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("  1. ") == 2 and "  2. " not in printed


@pytest.mark.usefixtures("stand_in_backbones")  # the input pipeline, not VGG16
@pytest.mark.heavy
def test_variable_length_trains_on_batches_padded_to_different_lengths(tmp_path):
    """Clips of 3 to 10 frames in batches of 2, padded to 8 frames but one batch to 16: a batch of a
    length the first two batches did not have trains (on TensorFlow, Keras fixed a dataset's shapes
    from its first two batches before they were declared free)."""
    data = tmp_path / "data"
    for split, lengths in (("train", (3, 4, 5, 6, 7, 10)), ("val", (3, 10))):
        make_clips(data / split, lengths=lengths)
    out = tmp_path / "run"
    assert lrcn.main(["--data-dir", str(data), "--output-dir", str(out), "--variable-length", *TINY_FLAGS,
                      "--epochs", "2", "--fine-tune-epochs", "0", "--skip-image-check"]) == 0
    assert rundir.read_history(out / "phase1_log.csv")["epoch"] == [0.0, 1.0]
    batches = sequences.FrameSequences(sequences.list_sequences(data / "train"), 32, 2, length_multiple=8)
    assert sorted(batches[i][0].shape[1] for i in range(len(batches))) == [8, 8, 8, 8, 8, 16]


@pytest.mark.usefixtures("stand_in_backbones")  # the flags, not VGG16
def test_model_flags_recipe_and_cache_flag_reach_the_run(clips, tmp_path, caplog):
    """Every flag the resume check compares is a keyword of build_lrcn, and the command line
    passes them: --mixed-precision bfloat16 gives a bfloat16 backbone in the saved model;
    --recipe seed its head and learning rate; --no-feature-cache trains phase 1 on the frames
    (the default recipe with the cache: the short run above)."""
    import inspect

    assert set(lrcn.MODEL_ARGUMENTS) <= set(inspect.signature(lrcn.build_lrcn).parameters)
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO):
        assert lrcn.main(["--data-dir", str(clips), "--output-dir", str(out), "--frames", "3", *TINY_FLAGS,
                          "--epochs", "1", "--fine-tune-epochs", "0", "--mixed-precision", "bfloat16",
                          "--recipe", "seed", "--no-feature-cache", "--skip-image-check"]) == 0
    model = keras.saving.load_model(out / "phase1_best.keras")
    assert training.find_layer(model, "block2_conv1").dtype_policy.name == "mixed_bfloat16"
    assert training.find_layer(model, "gru").dtype_policy.name == "float32"
    assert "feature_norm" not in {layer.name for layer in model.get_layer("lrcn_head").layers}  # the seed's head
    assert json.loads((out / "args.json").read_text())["learning_rate"] == lrcn.RECIPES["seed"]["learning_rate"]
    assert "feature cache off: --no-feature-cache" in caplog.text
    assert "head trains on cached VGG16 features" not in caplog.text and not list((out / "features").glob("*.npy"))
    history = rundir.read_history(out / "phase1_log.csv")
    assert len(history["loss"]) == 1 and all(np.isfinite(history["loss"]))


def test_cli_bad_inputs(clips, tmp_path, caplog):
    base = ["--output-dir", str(tmp_path / "o"), "--frames", "3", *TINY_FLAGS]
    assert lrcn.main(["--data-dir", str(tmp_path / "none"), *base]) == 1
    assert "does not exist" in caplog.text
    (clips / "train" / "a" / "s9").mkdir()
    assert lrcn.main(["--data-dir", str(clips), *base]) == 1
    assert "s9: no frames" in caplog.text
    with pytest.raises(SystemExit):
        lrcn.main(["--data-dir", str(clips), "--output-dir", str(tmp_path / "o"), "--frames", "3", "--variable-length"])
    caplog.clear()
    assert lrcn.main(["--data-dir", str(clips), *base[:2], "--variable-length", *TINY_FLAGS, "--length-multiple", "0"]) == 1
    assert "--length-multiple must be >= 1. Received: 0" in caplog.text and not (tmp_path / "o").exists()
    caplog.clear()
    assert lrcn.main(["predict", "--model", str(tmp_path / "m.keras"), str(tmp_path / "missing.mp4")]) == 1
    assert "does not exist" in caplog.text


@pytest.mark.usefixtures("stand_in_backbones")  # about the training core, not VGG16
def test_resume_after_interruption(clips, tmp_path, monkeypatch):
    out = tmp_path / "run"
    args = ["--data-dir", str(clips), "--output-dir", str(out), "--frames", "3", *TINY_FLAGS,
            "--epochs", "2", "--fine-tune-epochs", "0", "--steps-per-epoch", "2"]
    kill_at_batch(monkeypatch, 3)  # first batch of epoch 2 (2 steps per epoch)
    with pytest.raises(Killed):
        lrcn.main(args)
    monkeypatch.undo()
    assert lrcn.main(args) == 0
    done = json.loads((out / "phase1_done.json").read_text())
    assert done["first_epoch"] == 1 and done["epochs_run"] == 1
    assert rundir.read_history(out / "phase1_log.csv")["epoch"] == [0.0, 1.0]


def test_warns_when_recurrent_dropout_rules_out_cudnn(monkeypatch, caplog):
    from helpers import precision

    monkeypatch.setattr(precision, "gpu_compute_capability", lambda: (8, 0))
    lrcn.build_lrcn(3, 2, 32, 8, 4, weights=None, recurrent_dropout=0.5)
    assert "--recurrent-dropout 0 allows it" in caplog.text
    caplog.clear()
    lrcn.build_lrcn(3, 2, 32, 8, 4, weights=None, recurrent_dropout=0.0)
    assert "cuDNN" not in caplog.text


# ---------------------------------------------------------------- real footage

def test_one_call_extraction_of_class_folders_split_by_group(tmp_path, caplog):
    videos = tmp_path / "videos"
    for name in ("Jump", "Run"):
        for group, clip in ((1, 1), (1, 2), (2, 1), (3, 1), (4, 1)):
            (videos / name).mkdir(parents=True, exist_ok=True)
            write_video(videos / name / f"v_{name}_g{group:02d}_c{clip:02d}.avi", frames=6)
    (videos / "Run" / "v_Run_g05_c01.mp4").write_bytes(b"not a video")  # named and skipped, counted
    (videos / "Run" / "notes.txt").write_text("ignored")
    out = tmp_path / "data"
    with caplog.at_level(logging.INFO):
        assert extract_frames.main([str(videos), "--output", str(out), "--size", "16", "--val-fraction", "0.2",
                                    "--test-fraction", "0.2"]) == 0
    assert "v_Run_g05_c01.mp4" in caplog.text and "1 skipped" in caplog.text
    written = {split: sorted(p.relative_to(out / split).as_posix() for p in (out / split).glob("*/*"))
               for split in ("train", "val", "test")}
    assert sum(map(len, written.values())) == 10
    for name in ("Jump", "Run"):
        groups = {split: {extract_frames.group_of(p) for p in written[split] if p.startswith(name)} for split in written}
        assert all(groups[a].isdisjoint(groups[b]) for a in groups for b in groups if a < b)  # a group in one split
        assert groups["train"]
    assert written["val"] and written["test"]
    clip = next((out / "train" / "Jump").iterdir())
    assert len(list(clip.glob("frame_*.jpg"))) == 6
    assert sequences.list_sequences(out / "train").class_names == ["Jump", "Run"]
    # too few groups for the split: one line naming the folder
    assert extract_frames.main([str(videos), "--output", str(tmp_path / "x"), "--val-fraction", "0.45",
                                "--test-fraction", "0.5"]) == 1
    assert "none is left for training" in caplog.text


@pytest.mark.usefixtures("stand_in_backbones")  # about the training core, not VGG16
@pytest.mark.parametrize("mixed_precision", ["off", "bfloat16"])
def test_phase1_on_cached_features_equals_the_whole_model(tmp_path, mixed_precision):
    """The head trained on cached frame features takes the same steps as the whole LRCN on the frames
    (same losses and weights to float32 rounding: rtol 1e-5), with dropout, and with a bfloat16 VGG16."""
    from helpers import features

    clips = make_clips(tmp_path / "train", lengths=(4, 5, 3, 6))
    split = sequences.list_sequences(clips)
    paths = [sequences.sampled_paths(sample, 3) for sample in split.samples]
    x = np.stack([sequences.load_frames(p, 32) for p in paths])
    y = np.eye(3, dtype="float32")[split.labels]

    def build():
        keras.utils.set_random_seed(0)
        model = lrcn.build_lrcn(3, frames=3, **TINY, mixed_precision=mixed_precision)
        training.set_backbone_trainable(model, "vgg16", False)
        return model

    whole = build()
    lrcn.compile_lrcn(whole, keras.optimizers.SGD(0.1))
    whole_losses = [float(whole.train_on_batch(x, y)[0]) for _ in range(3)]

    model = build()
    head = model.get_layer("lrcn_head")
    lrcn.compile_lrcn(head, keras.optimizers.SGD(0.1))
    cached = features.cached_features(training.find_layer(model, "frame_backbone"), [p for c in paths for p in c],
                                      tmp_path / "features", "train", loader=lambda chunk: sequences.load_frames(chunk, 32))
    inputs = [cached.reshape(len(paths), 3, -1), np.ones((len(paths), 3), bool)]
    head_losses = [float(head.train_on_batch(inputs, y)[0]) for _ in range(3)]

    np.testing.assert_allclose(head_losses, whole_losses, rtol=1e-5)
    assert whole_losses[0] != whole_losses[-1]  # it trained
    for a, b in zip(head.get_weights(), whole.get_layer("lrcn_head").get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- LRCN augmentation

def test_augmentation_is_the_same_for_every_frame_of_a_clip():
    rng = np.random.default_rng(0)
    clip = rng.uniform(0, 255, (5, 20, 20, 3)).astype("float32")
    for seed in range(6):
        whole = sequences.augment_clip(clip, np.random.default_rng(seed))
        assert whole.shape == clip.shape and whole.dtype == np.float32
        assert 0 <= whole.min() and whole.max() <= 255
        for t in range(len(clip)):  # frame t alone, with the same draws: the same crop and flip
            alone = sequences.augment_clip(clip[t:t + 1], np.random.default_rng(seed))[0]
            np.testing.assert_allclose(whole[t], alone, atol=1e-4)
    changed = [not np.allclose(sequences.augment_clip(clip, np.random.default_rng(s)), clip) for s in range(6)]
    assert sum(changed) >= 5


def test_augment_changes_batches_per_clip_and_epoch_not_labels(tmp_path):
    rng = np.random.default_rng(1)
    for name in ("a", "b"):
        for clip in range(2):
            folder = tmp_path / "train" / name / f"c{clip}"
            folder.mkdir(parents=True)
            for t in range(3):
                Image.fromarray(rng.uniform(0, 255, (16, 16, 3)).astype("uint8")).save(folder / f"{t}.png")
    split = sequences.list_sequences(tmp_path / "train")
    plain = sequences.FrameSequences(split, 16, 4, frames=3, workers=1)
    augmented = sequences.FrameSequences(split, 16, 4, frames=3, workers=1, augment=True, seed=3)
    (x, y), (xa, ya) = plain[0], augmented[0]
    np.testing.assert_array_equal(y, ya)
    assert xa.shape == x.shape and not np.allclose(xa, x)
    augmented.on_epoch_end()
    assert not np.allclose(augmented[0][0], xa)  # new draws each epoch
