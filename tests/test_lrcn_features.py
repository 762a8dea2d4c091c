"""The LRCN on feature clips (``.npy`` files of per-frame features), its baselines, predictions over
time on long inputs, and the UCF101 feature conversion tool."""

import json
from pathlib import Path

import keras
import numpy as np
import pytest

import lrcn
from helpers import rundir, sequences, timeline, ucf101_features
from helpers.data import DatasetError
from helpers.errors import UsageError
from helpers.layers import PAD_VALUE, MiddleFrame
from tests.conftest import Killed, file_times, kill_at_batch

WIDTH = 6
HEAD_FLAGS = ["--dense-units", "8", "--gru-units", "8", "--batch-size", "4", "--workers", "1"]


def write_feature_clips(root, per_class=(8, 3, 3), lengths=(5, 9), width=WIDTH, classes=("up", "down"), seed=0):
    """``.npy`` clips ``(frames, width)`` float16 in ``train``/``val``/``test`` class folders; a clip
    of class ``up`` rises over its frames, one of ``down`` falls (the same values, reversed):
    only the frames' order tells the classes apart."""
    rng = np.random.default_rng(seed)
    for split, count in zip(("train", "val", "test"), per_class):
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                length = int(rng.integers(lengths[0], lengths[1] + 1))
                ramp = np.linspace(0, 1, length)[:, None] * np.ones(width) + 0.05 * rng.normal(size=(length, width))
                np.save(folder / f"clip{i}.npy", (ramp if label == 0 else ramp[::-1]).astype(np.float16))
    return root


@pytest.fixture
def feature_clips(tmp_path):
    return write_feature_clips(tmp_path / "data")


# ---------------------------------------------------------------- model

@pytest.mark.parametrize("temporal", lrcn.TEMPORAL)
def test_head_only_model_shapes_and_padding(temporal):
    model = lrcn.build_lrcn(3, frames=None, dense_units=8, gru_units=4, feature_width=WIDTH, temporal=temporal)
    assert model.input_shape == (None, None, WIDTH) and model.output_shape == (None, 3)
    assert not any("vgg16" in layer.name for layer in model.layers)
    rng = np.random.default_rng(0)
    short, long = (rng.normal(size=(1, n, WIDTH)).astype("float32") for n in (3, 7))
    padded = np.full((2, 7, WIDTH), PAD_VALUE, "float32")
    padded[0, :3], padded[1] = short[0], long[0]
    together = model.predict(padded, verbose=0)  # a padded clip gets what it gets alone
    np.testing.assert_allclose(together[0], model.predict(short, verbose=0)[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(together[1], model.predict(long, verbose=0)[0], rtol=1e-5, atol=1e-6)


def test_middle_frame_takes_the_middle_real_frame():
    x = np.arange(2 * 5 * 2, dtype="float32").reshape(2, 5, 2)
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]], bool)  # 5 real frames -> index 2; 4 -> index 1
    got = keras.ops.convert_to_numpy(MiddleFrame()([x, mask]))
    np.testing.assert_array_equal(got, np.stack([x[0, 2], x[1, 1]]))


def test_frame_average_is_blind_to_order_and_the_gru_is_not():
    rng = np.random.default_rng(1)
    clip = rng.normal(size=(1, 6, WIDTH)).astype("float32")
    reversed_clip = clip[:, ::-1].copy()
    for temporal, blind in (("average", True), ("gru", False)):
        model = lrcn.build_lrcn(2, frames=6, dense_units=8, gru_units=4, feature_width=WIDTH, temporal=temporal)
        a, b = model.predict(clip, verbose=0), model.predict(reversed_clip, verbose=0)
        assert np.allclose(a, b, atol=1e-6) == blind, temporal


def test_baselines_refuse_per_frame_labels():
    with pytest.raises(UsageError, match="per_frame needs temporal gru"):
        lrcn.build_lrcn(2, frames=4, feature_width=WIDTH, temporal="average", per_frame=True)


# ---------------------------------------------------------------- data

def test_feature_clips_listed_with_their_width(feature_clips):
    split = sequences.list_sequences(feature_clips / "train")
    assert split.features == WIDTH and split.class_names == ["down", "up"] and len(split) == 16
    assert all(isinstance(s, Path) and s.suffix == ".npy" for s in split.samples)
    batches = sequences.FrameSequences(split, None, 4, frames=None, length_multiple=4)
    x, y = batches[0]
    assert x.dtype == np.float32 and x.ndim == 3 and x.shape[2] == WIDTH and x.shape[1] % 4 == 0
    lengths = [sequences.sequence_length(split.samples[i]) for i in batches.batches[0]]
    for row, length in enumerate(lengths):  # the clip, then padding
        np.testing.assert_allclose(x[row, :length], np.load(split.samples[batches.batches[0][row]]), rtol=1e-3)
        assert (x[row, length:] == PAD_VALUE).all()
    fixed = sequences.FrameSequences(split, None, 4, frames=3)[0][0]
    assert fixed.shape == (4, 3, WIDTH)


def test_mixed_kinds_and_widths_are_refused_naming_two(feature_clips, tmp_path):
    (feature_clips / "train" / "up" / "frames_clip").mkdir()
    with pytest.raises(DatasetError, match=r"mixed \(.*frames_clip and .*\.npy\)") as error:
        sequences.list_sequences(feature_clips / "train")
    assert "\n" not in str(error.value)
    (feature_clips / "train" / "up" / "frames_clip").rmdir()
    np.save(feature_clips / "train" / "up" / "wide.npy", np.zeros((4, WIDTH + 1), np.float16))
    with pytest.raises(DatasetError, match=rf"different widths: .*has {WIDTH} features per frame, .*wide.npy {WIDTH + 1}"):
        sequences.list_sequences(feature_clips / "train")
    (feature_clips / "train" / "up" / "wide.npy").unlink()
    np.save(feature_clips / "train" / "up" / "flat.npy", np.zeros(5, np.float16))
    with pytest.raises(DatasetError, match=r"flat.npy: a feature clip must be .*Received: shape \(5,\)"):
        sequences.list_sequences(feature_clips / "train")
    (feature_clips / "train" / "up" / "flat.npy").unlink()
    bad = np.zeros((4, WIDTH), np.float32)
    bad[1, 2] = np.nan
    np.save(feature_clips / "val" / "up" / "nan.npy", bad)
    with pytest.raises(DatasetError, match="nan.npy: NaN or infinite values"):
        sequences.check_sequences(sequences.list_sequences(feature_clips / "val"))


def test_train_refuses_splits_of_different_kinds(feature_clips, tmp_path, caplog):
    from tests.conftest import make_clips

    for name in ("up", "down"):
        for clip in (feature_clips / "val" / name).iterdir():
            clip.unlink()
    make_clips(feature_clips / "val", classes=("up", "down"), lengths=(3,))
    out = tmp_path / "run"
    assert lrcn.main(["--data-dir", str(feature_clips), "--output-dir", str(out), "--frames", "4", *HEAD_FLAGS]) == 1
    assert "(6 features per frame) and " in caplog.text and "(frames) are not the same kind of clip" in caplog.text
    assert not out.exists()


# ---------------------------------------------------------------- runs

@pytest.mark.heavy
def test_feature_clip_run_trains_evaluates_predicts_and_resumes(feature_clips, tmp_path, monkeypatch, capsys):
    """One phase on feature clips (no backbone), killed in its second epoch and resumed; then
    ``evaluate``, ``predict`` and ``classify()`` on ``.npy`` clips agree with the model."""
    out = tmp_path / "run"
    args = ["--data-dir", str(feature_clips), "--output-dir", str(out), "--variable-length", "--length-multiple", "4",
            *HEAD_FLAGS, "--epochs", "3", "--steps-per-epoch", "2", "--learning-rate", "0.01"]
    kill_at_batch(monkeypatch, 3)  # the first batch of epoch 2
    with pytest.raises(Killed):
        lrcn.main(args)
    monkeypatch.undo()
    assert lrcn.main(args) == 0
    done = json.loads((out / "phase1_done.json").read_text())
    assert done["first_epoch"] == 1 and rundir.read_history(out / "phase1_log.csv")["epoch"] == [0.0, 1.0, 2.0]
    assert not (out / "phase2_best.keras").exists()  # nothing to fine-tune
    assert json.loads((out / "args.json").read_text())["feature_width"] == WIDTH
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["num_images"] == 6 and "shuffled_frames_top1" in metrics
    before = file_times(out)
    assert lrcn.main(args) == 0  # a finished run: nothing trained again
    assert {k: v for k, v in file_times(out).items() if k.startswith("phase1")} == \
        {k: v for k, v in before.items() if k.startswith("phase1")}

    model_path = out / "phase1_best.keras"
    capsys.readouterr()
    assert lrcn.main(["evaluate", "--model", str(model_path), "--data-dir", str(feature_clips)]) == 0
    assert f"{100 * metrics['top1']:.2f}%" in capsys.readouterr().out
    clip = feature_clips / "test" / "up" / "clip0.npy"
    model = keras.saving.load_model(model_path)
    expected = model.predict(np.load(clip).astype("float32")[None], verbose=0)[0]
    ranked = lrcn.classify(model_path, clip, top_k=2)[0]  # one path: one clip
    assert dict(ranked) == pytest.approx({name: float(p) for name, p in zip(["down", "up"], expected)}, rel=1e-5)
    assert lrcn.classify(model, [np.load(clip)], top_k=1, class_names=["down", "up"])[0][0][0] == ranked[0][0]
    assert lrcn.main(["predict", "--model", str(model_path), "--top-k", "1", str(clip)]) == 0
    assert f"1. {ranked[0][0]}: {ranked[0][1]:.4f}" in capsys.readouterr().out
    with pytest.raises(UsageError, match=r"reads feature clips .*not frames"):
        lrcn.classify(model, [np.zeros((3, 8, 8, 3), np.uint8)])
    with pytest.raises(UsageError, match=rf"reads {WIDTH} features per frame"):
        lrcn.classify(model, [np.zeros((3, WIDTH + 2), np.float32)])


@pytest.mark.heavy
@pytest.mark.parametrize("temporal", ["average", "middle-frame"])
def test_baselines_train_as_flags(feature_clips, tmp_path, temporal):
    out = tmp_path / temporal
    assert lrcn.main(["--data-dir", str(feature_clips), "--output-dir", str(out), "--frames", "5", *HEAD_FLAGS,
                      "--epochs", "1", "--temporal", temporal]) == 0
    head = keras.saving.load_model(out / "phase1_best.keras").get_layer("lrcn_head")
    names = {layer.name for layer in head.layers}
    assert "gru" not in names and ("frame_average" if temporal == "average" else "middle_frame") in names


def test_augment_is_refused_on_feature_clips(feature_clips, tmp_path):
    args = lrcn.parse_args(["--data-dir", str(feature_clips), "--output-dir", str(tmp_path / "r"), "--frames", "4",
                            *HEAD_FLAGS, "--augment"])
    with pytest.raises(UsageError, match=r"feature clips \(.npy\) have no pixels to augment"):
        lrcn.train(args)


@pytest.mark.tensorflow
def test_exported_feature_model_serves_what_classify_gives(feature_clips, tmp_path):
    import tensorflow as tf

    from helpers import export

    model = lrcn.build_lrcn(2, frames=5, dense_units=8, gru_units=4, feature_width=WIDTH)
    path = tmp_path / "m.keras"
    model.save(path)
    export.export_model(model, tmp_path / "served")
    served = tf.saved_model.load(str(tmp_path / "served"))
    clip = np.load(feature_clips / "test" / "up" / "clip1.npy").astype("float32")
    batch = np.stack([clip[sequences.sample_indices(len(clip), 5)]] * 3)  # the batch size is free
    probabilities = served.serve(batch).numpy()
    ranked = dict(lrcn.classify(path, [clip], top_k=2, class_names=["down", "up"])[0])
    np.testing.assert_allclose(probabilities[2], [ranked["down"], ranked["up"]], rtol=1e-5)
    assert "serve_uint8" not in served.signatures


# ---------------------------------------------------------------- predictions over time

def test_sliding_windows_cover_the_input_and_hold_one_window():
    rows = [np.full(2, i, np.float32) for i in range(10)]
    got = [(s, e, w[:, 0].tolist()) for s, e, w in timeline.sliding_windows(iter(rows), window=4, stride=3)]
    assert got == [(0, 4, [0, 1, 2, 3]), (3, 7, [3, 4, 5, 6]), (6, 10, [6, 7, 8, 9])]
    got = [(s, e) for s, e, _ in timeline.sliding_windows(iter(rows), window=4, stride=4)]
    assert got == [(0, 4), (4, 8), (6, 10)]  # the last window ends at the last frame
    assert [(s, e) for s, e, _ in timeline.sliding_windows(iter(rows[:3]), window=4, stride=2)] == [(0, 3)]
    assert timeline.windows_in_frames(2.0, None, 25.0) == (50, 25)
    with pytest.raises(UsageError, match="at least one frame"):
        timeline.windows_in_frames(0.01, None, 10.0)


def write_two_part_video(path, seconds=6, fps=10, size=32):
    """A real MJPG video: red frames for its first half, blue for its second."""
    import cv2

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), float(fps), (size, size))
    for t in range(seconds * fps):
        frame = np.zeros((size, size, 3), np.uint8)
        frame[..., 2 if t < seconds * fps // 2 else 0] = 220  # BGR: red, then blue
        writer.write(frame)
    writer.release()
    return path


@pytest.mark.heavy
@pytest.mark.usefixtures("stand_in_backbones")  # the windows and the stream, not VGG16
def test_over_time_timeline_shows_where_a_long_video_changes(tmp_path, capsys):
    rng = np.random.default_rng(0)
    colours = {"red": (220, 0, 0), "blue": (0, 0, 220)}
    x = np.zeros((32, 4, 32, 32, 3), np.float32)
    for i in range(32):  # noisy red or blue clips
        x[i] = np.clip(np.array(colours["red" if i % 2 == 0 else "blue"]) + rng.normal(0, 20, (4, 32, 32, 3)), 0, 255)
    y = np.eye(2, dtype=np.float32)[[1 - i % 2 for i in range(32)]]  # classes ["blue", "red"]
    keras.utils.set_random_seed(0)
    model = lrcn.build_lrcn(2, frames=4, image_size=32, dense_units=8, gru_units=8, weights=None)
    lrcn.compile_lrcn(model, keras.optimizers.Adam(0.01))
    model.fit(x, y, epochs=15, batch_size=8, verbose=0)
    path = tmp_path / "run" / "model.keras"
    path.parent.mkdir()
    model.save(path)
    (path.parent / "classes.json").write_text(json.dumps({"class_names": ["blue", "red"]}))
    video = write_two_part_video(tmp_path / "long.avi")

    windows = lrcn.classify(path, str(video), top_k=1, window=1.0, stride=0.5)[0]
    assert windows[0]["unit"] == "s" and windows[0]["start"] == 0 and windows[-1]["end"] == pytest.approx(6.0)
    leaders = [(w["start"], w["end"], w["classes"][0][0]) for w in windows]
    assert all(label == "red" for start, end, label in leaders if end <= 3.0)
    assert all(label == "blue" for start, end, label in leaders if start >= 3.0)

    out = tmp_path / "timeline"
    assert lrcn.main(["predict", "--model", str(path), "--over-time", "--window", "1", "--output", str(out),
                      "--top-k", "2", str(video)]) == 0
    lines = (out / "long.csv").read_text().splitlines()
    assert lines[0] == "start,end,class_1,probability_1,class_2,probability_2"
    assert len(lines) - 1 == len(windows) and lines[1].startswith("0.000,1.000,red,")
    assert lines[-1].startswith("5.000,6.000,blue,")
    assert (out / "long.png").stat().st_size > 0
    assert "0-1s: red" in capsys.readouterr().out


def test_over_time_flags_are_judged_before_the_model_loads(tmp_path):
    model = tmp_path / "missing.keras"
    with pytest.raises(UsageError, match="--over-time needs --window"):
        lrcn.predict(lrcn.parse_args(["predict", "--model", str(model), "--over-time", "x.avi"]))
    with pytest.raises(UsageError, match="--window must be a positive number"):
        lrcn.predict(lrcn.parse_args(["predict", "--model", str(model), "--over-time", "--window", "-1",
                                      "--output", str(tmp_path / "o"), "x.avi"]))
    with pytest.raises(UsageError, match="a/x.avi and b/x.avi would both write x.csv"):
        lrcn.predict(lrcn.parse_args(["predict", "--model", str(model), "--over-time", "--window", "1",
                                      "--output", str(tmp_path / "o"), "a/x.avi", "b/x.avi"]))
    with pytest.raises(UsageError, match="go with --over-time"):
        lrcn.predict(lrcn.parse_args(["predict", "--model", str(model), "--window", "1", "x.avi"]))


# ---------------------------------------------------------------- the UCF101 feature tool

def write_release(src, groups, negative_class=None, frames=4, width=WIDTH, seed=0):
    """A tiny fake of the UCF101 feature release: ``groups[class number] = (train group sizes, test
    group sizes)``; clips of one group alike, groups apart (as cuts of one video are)."""
    import scipy.io

    rng = np.random.default_rng(seed)
    (src / "annos").mkdir(parents=True)
    (src / "vgg16_relu6").mkdir()
    lines, number = [], 0
    for label, (train_groups, test_groups) in groups.items():
        for subset, sizes in (("1", train_groups), ("2", test_groups)):
            for size in sizes:
                centre = rng.uniform(0, 1, width)
                for _ in range(size):
                    number += 1
                    video = f"v_{number:06d}"
                    feature = np.abs(centre + 0.01 * rng.normal(size=(frames, width)))
                    if label == negative_class:
                        feature -= 5
                    scipy.io.savemat(src / "vgg16_relu6" / f"{video}.mat", {"Feature": feature.astype(np.float32)})
                    lines.append(f"{video}\t{label}\t{subset}")
    (src / "annos" / "videos_labels_subsets.txt").write_text("\n".join(lines) + "\n")
    names = {1: "ApplyEyeMakeup", 2: "ApplyLipstick", 3: "Archery"}
    (src / "annos" / "actions.txt").write_text("".join(f"  {n}  {names[n]}\n" for n in groups))
    return src


def test_ucf101_tool_converts_splits_by_group_skips_placeholders_and_is_idempotent(tmp_path, capsys):
    src = write_release(tmp_path / "src", {1: ((3, 3), (2,)), 2: ((4, 3, 5, 2), (3,)), 3: ((5, 5, 4), (2, 2))},
                        negative_class=1)
    out = tmp_path / "data"
    assert ucf101_features.main([str(src), "--output", str(out), "--val-fraction", "0.2"]) == 0
    printed = capsys.readouterr().out
    assert "skipped ApplyEyeMakeup: 8 with negative values" in printed
    count = {split: {c.name: len(list(c.glob("*.npy"))) for c in (out / split).iterdir()} for split in
             ("train", "val", "test")}
    # 20% of 14 train videos is 3, moved to the group boundary nearest (the last group, 2 videos);
    # 20% of 14 for Archery is 3: its last group holds 4
    assert count == {"train": {"ApplyLipstick": 12, "Archery": 10}, "val": {"ApplyLipstick": 2, "Archery": 4},
                     "test": {"ApplyLipstick": 3, "Archery": 4}}
    assert "ApplyLipstick" in printed and "2 classes" in printed
    clip = np.load(out / "test" / "Archery" / sorted(p.name for p in (out / "test" / "Archery").iterdir())[0])
    assert clip.dtype == np.float16 and clip.shape == (4, WIDTH)
    split = sequences.list_sequences(out / "train")
    assert split.features == WIDTH

    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.npy")}
    victim = next(iter(before))
    victim.write_bytes(victim.read_bytes()[:40])  # a clip cut short by a kill
    assert ucf101_features.main([str(src), "--output", str(out)]) == 0
    assert "1 clips written" in capsys.readouterr().out
    assert np.load(victim).shape == (4, WIDTH)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.npy") if p != victim} == \
        {p: t for p, t in before.items() if p != victim}
    assert not list(out.rglob(".*partial"))


def test_ucf101_tool_names_a_bad_source(tmp_path, capsys):
    assert ucf101_features.main([str(tmp_path / "nowhere"), "--output", str(tmp_path / "o")]) == 2
    assert "videos_labels_subsets.txt does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_ucf101_tool_keeps_test_whole_and_leaves_out_copies_in_other_splits(tmp_path, capsys):
    import scipy.io

    src = write_release(tmp_path / "src", {2: ((4, 3, 5, 2), (3,)), 3: ((5, 5, 4), (2, 2))})
    mats = src / "vgg16_relu6"
    rows = [line.split("\t") for line in (src / "annos" / "videos_labels_subsets.txt").read_text().splitlines()]
    train_2 = [video for video, label, subset in rows if label == "2" and subset == "1"]
    test_2 = [video for video, label, subset in rows if label == "2" and subset == "2"]
    # the last train video, carved into val, made a copy of a test clip
    scipy.io.savemat(mats / f"{train_2[-1]}.mat", {"Feature": scipy.io.loadmat(mats / f"{test_2[0]}.mat")["Feature"]})
    out = tmp_path / "data"
    assert ucf101_features.main([str(src), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"left out of val: {train_2[-1]}, the same features as {test_2[0]} (test)" in printed
    assert len(list((out / "test" / "ApplyLipstick").glob("*.npy"))) == 3  # the official test split whole
    splits = {name: sequences.list_sequences(out / name) for name in ("train", "val", "test")}
    sequences.check_splits(splits)  # no clip in two splits
