import json
import re
import shutil
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

import cnn_rnn_classifier as crc
from helpers import backbones, backend, rundir, training
from tests.conftest import SHARED, Killed, file_times, kill_at_batch, weights_never_drawn, write_jpeg
from tests.conftest import CLASSIFIER_TINY as TINY, classifier_train_args as train_args

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- model

def test_seed_defaults_shapes_and_parameters():
    with weights_never_drawn():  # shapes and counts only, of 103 million weights
        model = crc.build_cnn_rnn_classifier(weights=None)
    assert model.input_shape == (None, 299, 299, 3)
    assert model.output_shape == (None, 100)
    assert model.get_layer("timesteps").output.shape == (None, 23, 3887)
    assert model.get_layer("rnn_lstm_1").output.shape == (None, 23, 2048)
    assert model.get_layer("rnn_lstm_2").output.shape == (None, 2048)
    assert model.get_layer("xception").output.shape == (None, 2048)
    assert model.count_params() == 103_256_716
    assert model.get_layer("xception").count_params() == 20_861_480
    assert not any(isinstance(layer, keras.layers.Lambda) for layer in model.layers)
    with pytest.raises(ValueError):
        model.get_layer("cnn_projection")  # 2048 units need no projection


@pytest.mark.usefixtures("stand_in_backbones")  # the projection and the head, not Xception
def test_small_configuration_projects_cnn_features():
    model = crc.build_cnn_rnn_classifier(num_classes=3, **TINY)
    assert model.get_layer("cnn_projection").output.shape == (None, 8)
    assert model.get_layer("merge").output.shape == (None, 8)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 71, 71, 3)).astype("float32")
    probabilities = model.predict(x, verbose=0)
    assert probabilities.shape == (2, 3)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.usefixtures("stand_in_backbones")  # the ablation's head, not Xception (2048 features either way)
def test_cnn_only_ablation_has_no_rnn_branch_and_its_head_takes_only_the_features():
    model = crc.build_cnn_rnn_classifier(num_classes=3, cnn_only=True, **TINY)
    names = [layer.name for layer in model.layers]
    assert "rnn_lstm_1" not in names and "merge" not in names and "cnn_projection" not in names
    assert model.get_layer("predictions").input.shape == (None, 2048)
    head = crc.classifier_head(model)
    assert [tuple(i.shape) for i in head.inputs] == [(None, 2048)]
    assert [layer.name for layer in head.layers if layer.weights] == ["predictions"]


def test_grayscale_layer_is_channel_mean():
    x = np.random.default_rng(1).uniform(-1, 1, (2, 5, 5, 3)).astype("float32")
    gray = keras.ops.convert_to_numpy(crc.ChannelMean()(x))
    np.testing.assert_allclose(gray[..., 0], x.mean(axis=-1), rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(image_size=64), r"image_size must be at least 71.*Received: image_size=64"),
        (dict(image_size=71, rnn_timesteps=23), r"must divide image_size\*\*2 = 5041.*Received: rnn_timesteps=23"),
        (dict(num_classes=1), r"num_classes must be at least 2.*Received: num_classes=1"),
        (dict(rnn_units=0, image_size=71, rnn_timesteps=71), r"Received: rnn_units=0"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        crc.build_cnn_rnn_classifier(**{"weights": None, **kwargs})


def test_failed_download_names_offline_options(monkeypatch):
    def offline(**_):
        raise Exception("URL fetch failure on https://storage.googleapis.com/...: None -- [Errno -3]")

    offline.__name__ = "Xception"
    monkeypatch.setattr(keras.applications, "Xception", offline)
    with pytest.raises(backbones.WeightsUnavailableError) as error:
        crc.build_cnn_rnn_classifier(num_classes=3, image_size=71, rnn_timesteps=71, rnn_units=8)
    text = str(error.value)
    assert "Could not download the ImageNet Xception weights" in text
    assert "--weights none" in text and "--weights PATH" in text


def test_missing_weights_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.weights.h5 does not exist"):
        crc.build_cnn_rnn_classifier(num_classes=3, image_size=71, rnn_timesteps=71, weights=str(tmp_path / "nowhere.weights.h5"))


def test_weights_from_local_file(tmp_path):
    source = keras.applications.Xception(include_top=False, weights=None, input_shape=(71, 71, 3), pooling="avg")
    path = tmp_path / "xception_notop.weights.h5"
    source.save_weights(path)
    model = crc.build_cnn_rnn_classifier(num_classes=3, image_size=71, rnn_timesteps=71, rnn_units=8, weights=str(path))
    for expected, actual in zip(source.get_weights(), model.get_layer("xception").get_weights()):
        np.testing.assert_array_equal(expected, actual)


@pytest.mark.skipif(not (SHARED / "weights" / "xception_imagenet_notop.weights.h5").is_file(),
                    reason="needs ../shared/weights")
def test_offline_imagenet_weights_load():
    model = crc.build_cnn_rnn_classifier(num_classes=3, image_size=71, rnn_timesteps=71, rnn_units=8,
                                         weights=str(SHARED / "weights" / "xception_imagenet_notop.weights.h5"))
    first = model.get_layer("xception").get_layer("block1_conv1").get_weights()[0]
    assert first.shape == (3, 3, 3, 32) and 0.05 < float(np.abs(first).mean()) < 1.0


@pytest.mark.usefixtures("stand_in_backbones")  # the project's layers' names, not Xception
def test_checkpoint_of_the_earlier_package_name_loads(tmp_path):
    """Checkpoints written before the layers moved to the ``helpers`` package (``cnn_rnn>Grayscale``,
    ``cnn_rnn>FusedLSTM``) still load in safe mode, with the same predictions."""
    model = crc.build_cnn_rnn_classifier(num_classes=3, **TINY)
    x = np.random.default_rng(2).uniform(-1, 1, (2, 71, 71, 3)).astype("float32")
    model.save(tmp_path / "new.keras")
    with zipfile.ZipFile(tmp_path / "new.keras") as new, zipfile.ZipFile(tmp_path / "old.keras", "w") as old:
        for item in new.infolist():
            content = new.read(item)
            if item.filename == "config.json":
                assert b'"helpers>ChannelMean"' in content and b'"helpers>FusedLSTM"' in content
                content = content.replace(b'"helpers>ChannelMean"', b'"cnn_rnn>Grayscale"').replace(b'"helpers>', b'"cnn_rnn>')
            old.writestr(item, content)
    loaded = keras.saving.load_model(tmp_path / "old.keras", safe_mode=True)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6)


# ---------------------------------------------------------------- data

def test_standardize_maps_to_xception_range():
    generator = crc.CustomImageDataGenerator()
    x = np.array([[[0, 127.5, 255]]], dtype="float32")
    np.testing.assert_allclose(generator.standardize(x.copy()), [[[-1.0, 0.0, 1.0]]])
    assert generator.standardize(np.full((4, 4, 3), 255, "float32")).max() == 1.0


def test_generator_converts_grayscale_and_cmyk_to_rgb(tmp_path):
    rgb = write_jpeg(tmp_path / "d" / "a" / "rgb.jpg", 0, size=71)
    gray = write_jpeg(tmp_path / "d" / "a" / "gray.jpg", 1, size=71, mode="L")
    cmyk = write_jpeg(tmp_path / "d" / "a" / "cmyk.jpg", 2, size=71, mode="CMYK")
    iterator = crc.CustomImageDataGenerator().flow_from_directory(
        str(tmp_path / "d"), target_size=(71, 71), batch_size=3, shuffle=False)
    batch, labels = iterator[0]
    assert batch.shape == (3, 71, 71, 3) and labels.shape == (3, 1)
    assert -1.0 <= batch.min() and batch.max() <= 1.0
    order = [Path(p).name for p in iterator.filepaths]
    for path in (rgb, gray, cmyk):
        expected = np.asarray(Image.open(path).convert("RGB"), dtype="float32") / 127.5 - 1
        np.testing.assert_allclose(batch[order.index(path.name)], expected, atol=1e-5)
    gray_batch = batch[order.index("gray.jpg")]
    np.testing.assert_array_equal(gray_batch[..., 0], gray_batch[..., 2])


# ---------------------------------------------------------------- training end to end

PROMISED = ["args.json", "classes.json", "metrics.json", "phase1_best.keras", "phase2_best.keras",
            "phase1_log.csv", "phase2_log.csv", "phase1_curves.png", "phase2_curves.png", "confusion_matrix.png"]


@pytest.mark.usefixtures("stand_in_backbones")  # the run, not Xception (whose training: test_precision.py)
@pytest.mark.heavy
def test_two_phase_run_writes_every_output(class_folders, tmp_path, capsys):
    out = tmp_path / "run"
    (class_folders / "words.txt").write_text("cat\tdomestic cat\ndog\tdomestic dog\n")
    code = crc.main(train_args(class_folders, out, "--epochs", "1", "--fine-tune-epochs", "1"))
    assert code == 0
    for name in PROMISED:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    tensorboard = (out / "logs" / "phase1").is_dir() and (out / "logs" / "phase2").is_dir()
    assert tensorboard == backend.has_tensorflow()  # its event files need TensorFlow
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["num_images"] == 9
    assert set(metrics["per_class_accuracy"]) == {"cat", "dog", "fox"}
    assert 0.0 <= metrics["top1"] <= metrics["top5"] == 1.0  # 3 classes: top-5 always right
    assert sum(map(sum, metrics["confusion_matrix"])) == 9
    assert json.loads((out / "args.json").read_text())["rnn_units"] == 8
    assert json.loads((out / "classes.json").read_text())["descriptions"] == {"cat": "domestic cat", "dog": "domestic dog"}
    history = rundir.read_history(out / "phase1_log.csv")
    assert {"loss", "accuracy", "top5_accuracy", "val_loss", "val_accuracy", "val_top5_accuracy"} <= set(history)
    assert "top-1 accuracy" in capsys.readouterr().out

    # Phase 1 froze the backbone; phase 2 trained it but left BatchNormalization in inference mode.
    phase1 = keras.saving.load_model(out / "phase1_best.keras")
    phase2 = keras.saving.load_model(out / "phase2_best.keras")
    conv1, conv2 = (m.get_layer("xception").get_layer("block1_conv1").get_weights()[0] for m in (phase1, phase2))
    assert not np.allclose(conv1, conv2)
    bn1, bn2 = (m.get_layer("xception").get_layer("block1_conv1_bn").get_weights() for m in (phase1, phase2))
    for a, b in zip(bn1, bn2):
        np.testing.assert_array_equal(a, b)

    # evaluate and predict on the saved model
    assert crc.main(["evaluate", "--model", str(out / "phase2_best.keras"), "--data-dir", str(class_folders),
                     "--json", str(tmp_path / "eval.json")]) == 0
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    assert evaluated["num_images"] == 9 and evaluated["top1"] == pytest.approx(metrics["top1"])
    capsys.readouterr()
    assert crc.main(["predict", "--model", str(out / "phase2_best.keras"), "--top-k", "2",
                     str(class_folders / "test" / "cat")]) == 0
    printed = capsys.readouterr().out
    assert printed.count("  1. ") == 3 and printed.count("  2. ") == 3 and "  3. " not in printed
    ranked = re.findall(r"^  ([12])\. (.+): ([0-9.]+)$", printed, flags=re.MULTILINE)
    assert {label for _, label, _ in ranked} <= {"cat (domestic cat)", "dog (domestic dog)", "fox"}
    for first, second in zip(ranked[::2], ranked[1::2]):  # each image: two different classes, best first
        assert first[1] != second[1] and 1.0 >= float(first[2]) >= float(second[2]) >= 0.0

    # Rerunning the finished command runs no phase again.
    before = (out / "phase2_best.keras").stat().st_mtime_ns
    assert crc.main(train_args(class_folders, out, "--epochs", "1", "--fine-tune-epochs", "1")) == 0
    assert (out / "phase2_best.keras").stat().st_mtime_ns == before


@pytest.mark.usefixtures("stand_in_backbones")  # the averaging, not Xception
@pytest.mark.xdist_group("trained_classifier")  # one worker trains the shared run
def test_test_time_flips_average_each_image_with_its_mirror_image(trained_classifier, tmp_path, capsys):
    """``--tta flip``/``classify(tta="flip")``: each image's probabilities are the mean of the model's
    on it and on its mirror image (not the image's alone); ``evaluate --tta flip`` reports it."""
    from helpers.layers import flip_averaged

    model_path = trained_classifier.run / "phase1_best.keras"
    images = [np.random.default_rng(i).integers(0, 256, (71, 71, 3)).astype(np.uint8) for i in range(3)]
    names = [f"c{i}" for i in range(3)]

    def probabilities(inputs, tta="none"):
        return np.array([[dict(ranked)[n] for n in names]
                         for ranked in crc.classify(model_path, inputs, top_k=3, class_names=names, tta=tta)])

    plain, mirrored = probabilities(images), probabilities([image[:, ::-1] for image in images])
    flipped = probabilities(images, "flip")
    np.testing.assert_allclose(flipped, (plain + mirrored) / 2, atol=1e-6)
    assert np.abs(flipped - plain).max() > 1e-4  # the mirror image counts
    np.testing.assert_allclose(flipped.sum(axis=1), 1, rtol=1e-5)
    symmetric = [np.concatenate([image[:, :36], image[:, :35][:, ::-1]], axis=1) for image in images]
    np.testing.assert_allclose(probabilities(symmetric, "flip"), probabilities(symmetric), atol=1e-6)
    model = keras.saving.load_model(model_path)
    assert flip_averaged(model, "none") is model and flip_averaged(model).name == model.name
    with pytest.raises(ValueError, match="tta must be one of none, flip. Received: 'crop'"):
        flip_averaged(model, "crop")

    report = tmp_path / "flip.json"
    assert crc.main(["evaluate", "--model", str(model_path), "--data-dir", str(trained_classifier.data),
                     "--split", "val", "--tta", "flip", "--json", str(report)]) == 0
    assert "test-time flips" in capsys.readouterr().out and json.loads(report.read_text())["tta"] == "flip"


@pytest.mark.usefixtures("stand_in_backbones")  # about the training core, not Xception
def test_model_flags_reach_the_builder_and_phase_2_runs_alone(class_folders, tmp_path):
    """Every flag the resume check compares is a keyword of the builder, and the command line
    passes them: --mixed-precision bfloat16 gives a bfloat16 Xception in the saved model (the
    LSTMs' float32: test_precision.py), --cnn-only the ablation; --epochs 0 runs phase 2 alone."""
    import inspect

    assert set(crc.MODEL_ARGUMENTS) <= set(inspect.signature(crc.build_cnn_rnn_classifier).parameters)
    out = tmp_path / "run"
    assert crc.main(train_args(class_folders, out, "--epochs", "0", "--fine-tune-epochs", "1", "--cnn-only",
                               "--mixed-precision", "bfloat16", "--skip-image-check")) == 0
    assert not (out / "phase1_best.keras").exists() and (out / "phase2_best.keras").is_file()
    assert json.loads((out / "metrics.json").read_text())["model"].endswith("phase2_best.keras")
    model = keras.saving.load_model(out / "phase2_best.keras")
    assert model.name == "cnn_classifier"
    assert model.get_layer("xception").get_layer("block1_conv1").dtype_policy.name == "mixed_bfloat16"
    assert model.get_layer("predictions").dtype_policy.name == "float32"


@pytest.mark.xdist_group("trained_classifier")  # one worker trains the shared run
def test_resume_with_other_model_flags_is_refused(trained_classifier, tmp_path, caplog):
    trained, argv = trained_classifier.run, trained_classifier.argv
    out = shutil.copytree(trained, tmp_path / "run")
    before = file_times(out)
    changed = argv(out)
    changed[changed.index("--rnn-units") + 1] = "16"
    assert crc.main(changed) == 1
    assert "--rnn-units 8 -> 16" in caplog.text
    assert file_times(out) == before


def test_nan_loss_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    batches = {"n": 0}

    def poison_after_batch_4(self, batch, logs=None):  # the weights turn NaN after epoch 2's first batch
        batches["n"] += 1
        if batches["n"] == 4:
            self.model.set_weights([np.full_like(w, np.nan) for w in self.model.get_weights()])

    monkeypatch.setattr(keras.callbacks.CSVLogger, "on_train_batch_end", poison_after_batch_4, raising=False)

    class Batches(keras.utils.PyDataset):
        def __len__(self):
            return 3

        def __getitem__(self, index):
            return np.ones((4, 2), "float32") * index, np.ones((4, 1), "float32")

    inputs = keras.Input((2,))
    model = keras.Model(inputs, keras.layers.Dense(1)(inputs))
    model.compile("sgd", "mse")
    with pytest.raises(training.NaNLossError, match=r"phase1: the loss became nan at epoch 2, batch 2"):
        training.Trainer(tmp_path).fit(model, "phase1", Batches(),
                                       (np.ones((2, 2), "float32"), np.ones((2, 1), "float32")),
                                       epochs=3, monitor="val_loss")
    good = keras.saving.load_model(tmp_path / "phase1_best.keras")
    assert all(np.isfinite(w).all() for w in good.get_weights())
    assert rundir.read_history(tmp_path / "phase1_log.csv")["epoch"] == [0.0]
    assert not (tmp_path / "phase1_done.json").exists()


@pytest.mark.usefixtures("stand_in_backbones")  # about the training core, not Xception
def test_nan_loss_in_cli_is_one_clear_error(class_folders, tmp_path, caplog):
    code = crc.main(train_args(class_folders, tmp_path / "run", "--epochs", "2", "--fine-tune-epochs", "0",
                               "--learning-rate", "1e30"))
    assert code == 1
    assert "the loss became" in caplog.text and "Lower the learning rate" in caplog.text


# ---------------------------------------------------------------- bad input

def _error_of(argv, caplog):
    caplog.clear()
    assert crc.main(argv) == 1
    return caplog.text


def test_missing_and_empty_data_dir(tmp_path, caplog):
    assert f"Data directory {tmp_path / 'nope'} does not exist" in _error_of(train_args(tmp_path / "nope", tmp_path / "o"), caplog)
    (tmp_path / "empty").mkdir()
    assert "is empty" in _error_of(train_args(tmp_path / "empty", tmp_path / "o"), caplog)
    (tmp_path / "nosplits" / "train").mkdir(parents=True)
    assert "has no class folders" in _error_of(train_args(tmp_path / "nosplits", tmp_path / "o"), caplog)


def test_class_folder_without_images(class_folders, tmp_path, caplog):
    (class_folders / "train" / "emu").mkdir()
    (class_folders / "train" / "emu" / "readme.txt").write_text("no images here")
    text = _error_of(train_args(class_folders, tmp_path / "o"), caplog)
    assert f"{class_folders / 'train' / 'emu'}: no images" in text
    assert f"{class_folders / 'val' / 'emu'}: class folder missing" in text


@pytest.mark.parametrize("damage", ["truncate", "text"])
def test_unreadable_image_is_named_and_nothing_trained(class_folders, tmp_path, caplog, damage):
    bad = class_folders / "val" / "dog" / "dog_1.jpg"
    if damage == "truncate":
        bad.write_bytes(bad.read_bytes()[:200])
    else:
        bad.write_text("this is not a JPEG")
    text = _error_of(train_args(class_folders, tmp_path / "o"), caplog)
    assert "1 of 36 images cannot be decoded" in text and str(bad) in text
    assert not (tmp_path / "o" / "phase1_log.csv").exists()


def test_non_image_files_are_ignored(class_folders, tmp_path):
    from helpers import data

    (class_folders / "train" / "cat" / "notes.txt").write_text("x")
    (class_folders / "train" / "cat" / ".DS_Store").write_bytes(b"\0")
    splits = data.load_splits(class_folders)
    assert len(splits["train"]) == 18 and splits["train"].skipped == 2
    assert splits["train"].labels == [0] * 6 + [1] * 6 + [2] * 6


def test_flag_errors(class_folders, tmp_path, caplog):
    assert "--rnn-timesteps must divide --image-size**2" in _error_of(
        train_args(class_folders, tmp_path / "o") + ["--rnn-timesteps", "7"], caplog)
    assert "both 0" in _error_of(train_args(class_folders, tmp_path / "o", "--epochs", "0", "--fine-tune-epochs", "0"), caplog)
    assert "--batch-size must be >= 1. Received: 0" in _error_of(train_args(class_folders, tmp_path / "o", "--batch-size", "0"), caplog)
    assert "does not exist" in _error_of(["evaluate", "--model", str(tmp_path / "m.keras"), "--data-dir", str(class_folders)], caplog)


# ---------------------------------------------------------------- tf.data input path

@pytest.mark.tensorflow  # the tf.data input path
def test_tf_data_path_matches_generator(class_folders):
    from helpers import data

    split = data.list_split(class_folders / "train", None, "train")
    generated = crc.flow_from_split(split, 71, 18, shuffle=False)[0]
    images, labels = next(iter(crc.tf_data_batches(split, 71, 18, shuffle=False, workers=2)))
    assert images.shape == (18, 71, 71, 3) and images.dtype == "float32"
    np.testing.assert_array_equal(labels, generated[1])
    np.testing.assert_array_equal(images, generated[0])  # one image reader: the same pixels
    shuffled = [np.argmax(y, 1) for _, y in crc.tf_data_batches(split, 71, 18, shuffle=True, seed=0)]
    assert sorted(shuffled[0]) == sorted(split.labels) and list(shuffled[0]) != list(split.labels)


@pytest.mark.tensorflow  # the tf.data input path
def test_both_input_paths_read_ppm_and_tiff_alike(class_folders):
    from helpers import data

    rng = np.random.default_rng(0)
    for suffix in ("ppm", "tiff"):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
            class_folders / "train" / "cat" / f"extra.{suffix}")
    split = data.list_split(class_folders / "train", None, "train")
    iterator = crc.flow_from_split(split, 71, 8, shuffle=False)  # iterating it never ends: index its batches
    generated = np.concatenate([iterator[i][0] for i in range(len(iterator))])
    read = np.concatenate([x for x, _ in crc.tf_data_batches(split, 71, 8, shuffle=False)])
    assert len(read) == 20
    np.testing.assert_array_equal(read, generated)


@pytest.mark.usefixtures("stand_in_backbones")  # about the training core, not Xception
@pytest.mark.tensorflow  # the tf.data input path
def test_train_with_tf_data_input(class_folders, tmp_path):
    out = tmp_path / "run"
    assert crc.main(train_args(class_folders, out, "--epochs", "1", "--fine-tune-epochs", "0", "--input", "tf.data",
                               "--workers", "1", "--mixed-precision", "off")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["num_images"] == 9


# ---------------------------------------------------------------- phase 1 on cached features, --augment

def _input_args(input_path="generator", augment=False):
    import argparse

    return argparse.Namespace(input=input_path, image_size=71, seed=0, workers=1, augment=augment)


@pytest.mark.usefixtures("stand_in_backbones")  # about the training core, not Xception
@pytest.mark.parametrize("mixed_precision", ["off", pytest.param("bfloat16", marks=pytest.mark.tensorflow)])
def test_phase1_on_cached_features_equals_the_whole_model(class_folders, tmp_path, mixed_precision):
    """classifier_head trained on cached Xception features (and the images, for the RNN branch) takes
    the same steps as the whole model on the images: losses and weights within rtol 1e-5, float32 and
    bfloat16 Xception."""
    from helpers import data, features

    split = data.list_split(class_folders / "train", None, "train")
    args = _input_args()
    x, y = crc.read_split(split, args, 6, shuffle=False)[0]

    def build():
        keras.utils.set_random_seed(0)
        model = crc.build_cnn_rnn_classifier(3, **TINY, mixed_precision=mixed_precision)
        training.set_backbone_trainable(model, "xception", False)
        return model

    whole = build()
    crc.compile_classifier(whole, keras.optimizers.RMSprop(0.01))
    whole_losses = [float(whole.train_on_batch(x, y)[0]) for _ in range(3)]

    model = build()
    head = crc.classifier_head(model)
    assert [tuple(i.shape) for i in head.inputs] == [(None, 2048), (None, 71, 71, 3)]
    cached = features.cached_features(model.get_layer("xception"), split.paths, tmp_path / "features", "train",
                                      images=lambda: crc.read_split(split, args, 4, shuffle=False), reader="generator")
    assert cached.shape == (len(split), 2048) and cached.dtype == np.float32
    (batch_features, images), labels = crc.read_split(split, args, 6, shuffle=False, features=cached)[0]
    np.testing.assert_array_equal(images, x)
    np.testing.assert_array_equal(labels, y)
    crc.compile_classifier(head, keras.optimizers.RMSprop(0.01))
    head_losses = [float(head.train_on_batch([batch_features, images], y)[0]) for _ in range(3)]

    np.testing.assert_allclose(head_losses, whole_losses, rtol=1e-5)
    assert whole_losses[0] != whole_losses[-1]  # it trained
    trained = [layer for layer in head.layers if layer.weights]
    assert {layer.name for layer in trained} == {"rnn_lstm_1", "rnn_lstm_2", "cnn_projection", "predictions"}
    for layer in trained:
        for a, b in zip(layer.get_weights(), whole.get_layer(layer.name).get_weights()):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.tensorflow  # the tf.data input path
def test_cached_features_follow_the_shuffled_images_in_both_input_paths(class_folders):
    from helpers import data

    split = data.list_split(class_folders / "train", None, "train")
    rows = np.arange(len(split), dtype="float32")[:, None] * np.ones((1, 2048), "float32")  # row i holds i
    for input_path in ("generator", "tf.data"):
        reader = crc.read_split(split, _input_args(input_path), 4, shuffle=True, features=rows)
        plain = {p: crc.read_split(split, _input_args(input_path), len(split), shuffle=False)[0][0][i]
                 if input_path == "generator" else None for i, p in enumerate(split.paths)}
        batches = [reader[i] for i in range(len(reader))] if input_path == "generator" else list(reader)
        seen = []
        for (batch_features, images), labels in batches:
            index = np.asarray(batch_features)[:, 0].astype(int)
            np.testing.assert_array_equal(np.argmax(labels, 1), np.asarray(split.labels)[index])
            if input_path == "generator":
                for i, image in zip(index, np.asarray(images)):
                    np.testing.assert_array_equal(image, plain[split.paths[i]])
            seen += list(index)
        assert sorted(seen) == list(range(len(split))) and seen != sorted(seen)  # all, shuffled


@pytest.mark.usefixtures("stand_in_backbones")  # about the training core, not Xception
@pytest.mark.xdist_group("trained_classifier")  # one worker trains the shared run
def test_phase1_cache_is_on_by_default_and_flags_turn_it_off(trained_classifier, tmp_path, caplog):
    """The shared run trained with the defaults: phase 1 on cached features, which are the
    backbone's output for each image; ``--no-feature-cache`` and ``--augment`` each turn the
    cache off (the decision for each flag alone, and one run with both, naming both)."""
    import logging

    from helpers import data, features

    def phase1_on_cache(**flags):
        trainer = training.Trainer(tmp_path / "new")
        return features.phase1_on_cache(trainer, "Xception", "image", **{"epochs": 1, **flags})

    assert phase1_on_cache()
    assert not phase1_on_cache(feature_cache=False) and not phase1_on_cache(augment=True)
    assert not phase1_on_cache(distribute="mirrored") and not phase1_on_cache(epochs=0)

    runs = {True: trained_classifier.run, False: tmp_path / "run"}
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert crc.main(trained_classifier.argv(runs[False]) + ["--no-feature-cache", "--augment"]) == 0
    logs = {True: trained_classifier.log, False: caplog.text}
    assert "feature cache off: --no-feature-cache, --augment" in logs[False]
    for cached, out in runs.items():
        assert ("head trains on cached Xception features" in logs[cached]) == cached
        assert ("feature cache off" in logs[cached]) == (not cached)
        files = sorted(p.name.split("-")[0] for p in (out / "features").glob("*.npy")) if cached else []
        assert files == (["train", "val"] if cached else [])
        assert len(rundir.read_history(out / "phase1_log.csv")["loss"]) == 1
        model = keras.saving.load_model(out / "phase1_best.keras")  # the whole model, not the head
        assert model.name == "cnn_rnn_classifier" and model.input_shape == (None, 71, 71, 3)
        if cached:  # the cache holds the backbone's output for each image, in the split's order
            split = data.list_split(trained_classifier.data / "train", None, "train")
            stored = np.load(next((out / "features").glob("train-*.npy")))
            expected = model.get_layer("xception").predict(crc.read_split(split, _input_args(), 4, False), verbose=0)
            np.testing.assert_allclose(stored, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.usefixtures("stand_in_backbones")  # about the training core, not Xception
@pytest.mark.heavy
def test_resume_after_interruption_reuses_the_cache_unless_an_image_changed(class_folders, tmp_path, monkeypatch,
                                                                           caplog):
    """Killed in epoch 2 (after epoch 1 was backed up), the same command continues from epoch 2,
    reading the features from the cache; after an image was rewritten, phase 1 computes them again
    (the cache key is the same function whether or not the run resumes)."""
    import logging
    import os

    out = tmp_path / "run"

    def args(epochs=3):
        return train_args(class_folders, out, "--epochs", str(epochs), "--fine-tune-epochs", "0",
                          "--steps-per-epoch", "2", "--skip-image-check")

    kill_at_batch(monkeypatch, 3)  # first batch of epoch 2 (2 steps per epoch)
    with pytest.raises(Killed):
        crc.main(args())
    monkeypatch.undo()
    assert rundir.read_history(out / "phase1_log.csv")["epoch"] == [0.0]
    assert (out / "backup" / "phase1").is_dir() and not (out / "phase1_done.json").exists()
    train_features = lambda: {p.name for p in (out / "features").glob("train-*.npy")}  # noqa: E731
    before = train_features()
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert crc.main(args()) == 0
    assert train_features() == before and len(before) == 1
    assert "features of 18 train images read from the cache" in caplog.text
    assert "resuming after 1 completed epochs" in caplog.text
    done = json.loads((out / "phase1_done.json").read_text())
    assert done["first_epoch"] == 1 and done["epochs_run"] == 2  # continued, not restarted
    assert rundir.read_history(out / "phase1_log.csv")["epoch"] == [0.0, 1.0, 2.0]
    assert not (out / "backup").exists()

    for name in ("phase1_log.csv", "phase1_best.keras", "phase1_done.json"):  # phase 1 again ...
        (out / name).unlink()
    image = next((class_folders / "train" / "cat").iterdir())  # ... after an image was rewritten: its size
    write_jpeg(image, seed=999)  # and modification time change
    os.utime(image, ns=(1, 1))
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert crc.main(args(epochs=1)) == 0
    after = train_features()
    assert len(after) == 1 and after != before
    assert "train images read from the cache" not in caplog.text and "features of 18 train images" in caplog.text


@pytest.mark.tensorflow  # the tf.data input path
def test_augment_changes_images_not_labels_in_both_input_paths(class_folders):
    from helpers import data

    split = data.list_split(class_folders / "train", None, "train")
    plain_images, plain_labels = crc.flow_from_split(split, 71, len(split), shuffle=False)[0]
    augmented = crc.flow_from_split(split, 71, len(split), shuffle=False, augment=True)
    tf_plain = next(iter(crc.tf_data_batches(split, 71, len(split), shuffle=False)))[0]
    tf_augmented = crc.tf_data_batches(split, 71, len(split), shuffle=False, seed=0, augment=True)
    epochs = [(np.asarray(augmented[0][0]), augmented[0][1]) for _ in range(2)]
    epochs += [tuple(np.asarray(t) for t in next(iter(tf_augmented))) for _ in range(2)]
    for i, (images, labels) in enumerate(epochs):
        base = plain_images if i < 2 else np.asarray(tf_plain)
        np.testing.assert_array_equal(labels, plain_labels)
        assert images.shape == base.shape and images.min() >= -1.0 and images.max() <= 1.0
        assert float(np.mean(np.abs(images - base))) > 0.01  # changed
    assert not np.array_equal(epochs[0][0], epochs[1][0]) and not np.array_equal(epochs[2][0], epochs[3][0])
