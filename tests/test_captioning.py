"""captioning.py: model, masking, decoding, text, data formats, metrics, and whole runs on tiny
captioned folders of real JPEGs (weights=None)."""

import json
import logging
import math
import shutil
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

import captioning as cap
from helpers import caption_batches, caption_evaluation, captions, features, rundir
from helpers.attention import SoftAttentionLSTM
from helpers.captions import END_ID, PAD_ID, START_ID, UNK_ID
from helpers.decoding import StepDecoder
from tests.conftest import (Killed, colour_captions, kill_at_batch, make_coco, make_flickr8k, weights_never_drawn,
                            write_photo)

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--weights", "none", "--image-size", "71", "--embedding-dim", "16", "--lstm-units", "16",
        "--min-word-count", "1", "--max-length", "6", "--batch-size", "8", "--fine-tune-batch-size", "3"]


@pytest.fixture
def flickr(tmp_path):
    return make_flickr8k(tmp_path / "flickr8k")


def tiny_captioner(inject="pre", vocabulary_size=12, decoder="show-and-tell", penalty=1.0):
    keras.utils.set_random_seed(0)
    return cap.build_captioner(vocabulary_size=vocabulary_size, image_size=71, embedding_dim=8, lstm_units=8,
                               decoder=decoder, inject=inject, attention_dim=8, attention_penalty=penalty,
                               dropout=0.0, weights=None, mixed_precision="off")


DECODERS = [("pre", "show-and-tell"), ("merge", "show-and-tell"), ("pre", "attention")]  # (inject, decoder)
# The tests whose evaluation scores METEOR run in one pytest-xdist worker: its Java scorer starts
# once per process (17 s of loading), so once per backend.
METEOR = pytest.mark.xdist_group("meteor")


# ----------------------------------------------------------------------------- model

@pytest.mark.parametrize("decoder", ["show-and-tell", "attention"])
def test_seed_size_captioners_on_xception(decoder):
    """Xception itself at 299 px: pooled features (batch, 2048) for show-and-tell, the 10 x 10 x 2048
    grid as (batch, 100, 2048) for attention; its 20.9 million weights counted, never drawn."""
    with weights_never_drawn():
        model = cap.build_captioner(vocabulary_size=3000, decoder=decoder, weights=None)
    encoder = model.get_layer("encoder")
    assert encoder.get_layer("xception").count_params() == 20_861_480
    assert encoder.output_shape == ((None, 100, 2048) if decoder == "attention" else (None, 2048))
    assert model.input_shape == [(None, 299, 299, 3), (None, None)]
    assert model.output_shape == (None, None, 3000)


@pytest.mark.usefixtures("stand_in_backbones")  # the decoder is under test, not Xception
@pytest.mark.parametrize("inject, decoder", DECODERS)
def test_shapes_and_padding_does_not_change_loss(inject, decoder):
    model = tiny_captioner(inject, decoder=decoder, penalty=0.0)
    cap.compile_captioner(model, keras.optimizers.Adam())
    images = np.random.default_rng(0).uniform(0, 255, (2, 71, 71, 3)).astype(np.float32)
    tokens = np.array([[START_ID, 5, 6, 7], [START_ID, 8, 9, 0]], np.int32)
    targets = np.array([[5, 6, 7, END_ID], [8, 9, END_ID, 0]], np.int32)
    assert model.predict([images, tokens], verbose=0).shape == (2, 4, 12)
    loss, accuracy = model.evaluate([images, tokens], targets, verbose=0)
    padded_tokens, padded_targets = np.pad(tokens, ((0, 0), (0, 5))), np.pad(targets, ((0, 0), (0, 5)))
    padded_loss, padded_accuracy = model.evaluate([images, padded_tokens], padded_targets, verbose=0)
    assert padded_loss == pytest.approx(loss, rel=1e-5) and padded_accuracy == pytest.approx(accuracy)
    # the loss is the mean over the 7 real words: a real word's target changed moves it
    wrong = targets.copy()
    wrong[0, 0] = 9
    assert model.evaluate([images, tokens], wrong, verbose=0)[0] != pytest.approx(loss)


@pytest.mark.parametrize("kwargs, message", [
    ({"vocabulary_size": 4}, "vocabulary_size=4"), ({"image_size": 64}, "image_size=64"),
    ({"embedding_dim": 0}, "embedding_dim=0"), ({"lstm_units": 0}, "lstm_units=0"),
    ({"inject": "post"}, "inject='post'"), ({"dropout": 1.0}, "dropout=1.0"),
    ({"decoder": "transformer"}, "decoder='transformer'"), ({"attention_dim": 0}, "attention_dim=0"),
    ({"attention_penalty": -1.0}, "attention_penalty=-1.0"),
])
def test_bad_model_arguments_are_refused_with_their_value(kwargs, message):
    arguments = dict(vocabulary_size=12, image_size=71, weights=None) | kwargs
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        cap.build_captioner(**arguments)


def test_attention_penalty_is_the_spread_of_coverage_over_real_steps():
    """Xu et al.'s eq. 14 less its constant: sum_i (T/L - sum_t alpha_ti)^2, mean over captions,
    the padded steps left out."""
    from helpers.attention import DoublyStochasticPenalty

    alphas = np.zeros((2, 3, 4), np.float32)
    alphas[0] = [[1, 0, 0, 0], [1, 0, 0, 0], [0.25] * 4]  # 3 real steps, looks at position 0 twice
    alphas[1, :2] = 0.25  # 2 real steps, even; its 3rd (padded) step looks at position 3 only
    alphas[1, 2] = [0, 0, 0, 1]
    mask = np.array([[1, 1, 1], [1, 1, 0]], bool)
    layer = DoublyStochasticPenalty(2.0)
    sequence = np.ones((2, 3, 5), np.float32)
    out = layer([sequence, alphas], mask=[mask, mask])
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(out), sequence)
    coverage = np.array([2.25, 0.25, 0.25, 0.25])
    expected = 2.0 * (((0.75 - coverage) ** 2).sum() + 0.0) / 2
    assert float(keras.ops.convert_to_numpy(layer.losses[0])) == pytest.approx(expected, rel=1e-6)
    # Xu et al.'s form differs by L (1 - T/L)^2 per caption only: a constant, so the same gradients
    xu = ((1 - coverage) ** 2).sum()
    assert xu - ((0.75 - coverage) ** 2).sum() == pytest.approx(4 * (1 - 0.75) ** 2)


def test_attention_over_grouped_captions_equals_one_grid_per_caption():
    """Phase 1 feeds each grid once with all its captions (image-major; batches of unequal sizes,
    which Keras takes from a dataset, not from arrays): the same probabilities, loss and attention
    weights as repeating the grid for every caption."""
    keras.utils.set_random_seed(3)
    decoder = cap.build_attention_decoder(12, (4, 6), 8, 8, 8, 1.0, 0.0)
    rng = np.random.default_rng(3)
    grids = rng.uniform(0, 2, (2, 4, 6)).astype(np.float32)
    tokens = rng.integers(4, 12, (6, 5)).astype(np.int32)
    tokens[:, 0], tokens[1, 3:], tokens[5, 2:] = START_ID, 0, 0
    grouped = decoder.predict_on_batch([grids, tokens])
    repeated = decoder.predict_on_batch([np.repeat(grids, 3, axis=0), tokens])
    np.testing.assert_allclose(grouped, repeated, atol=1e-6)
    alphas = keras.Model(decoder.inputs, decoder.get_layer("lstm").output[2])
    np.testing.assert_allclose(alphas.predict_on_batch([grids, tokens]),
                               alphas.predict_on_batch([np.repeat(grids, 3, axis=0), tokens]), atol=1e-6)
    np.testing.assert_allclose(alphas.predict_on_batch([grids, tokens]).sum(-1), 1.0, atol=1e-5)
    decoder.compile(loss="sparse_categorical_crossentropy")
    targets = np.roll(tokens, -1, axis=1)
    assert decoder.test_on_batch([grids, tokens], targets) == pytest.approx(
        decoder.test_on_batch([np.repeat(grids, 3, axis=0), tokens], targets), rel=1e-5)


@pytest.mark.backend_independent
def test_a_batch_in_parts_is_the_whole_batch_and_every_epoch_plan_is_reproducible(tmp_path):
    """Several processes each load a part of every planned batch (``helpers.distribute.ProcessSlices``):
    the parts, joined, are the whole batch (padded to its longest, not each part's), for pooled
    features, feature grids and images; ``plan_epoch`` draws the same batches for the same epoch."""
    lengths = ["a b", "a b c d e f g h i j", "a", "b c", "a b c", "a b c d"]
    split = captions.CaptionSplit("train", [str(write_photo(tmp_path / f"{i}.jpg", "red", i)) for i in range(6)],
                                  [[text, "a"] for text in lengths], Path("x"))
    table = caption_batches.CaptionTable(split, captions.Vocabulary.from_captions(lengths, 1, 12))
    pooled, grids = np.random.default_rng(0).random((6, 4), np.float32), np.ones((6, 2, 3), np.float16)
    for kind, batch_size in (("pooled", 4), ("grid", 4), ("images", 2)):
        inputs = {"pooled": dict(features=pooled), "grid": dict(features=grids),
                  "images": dict(paths=split.paths, image_size=8)}[kind]
        batches = caption_batches.CaptionBatches(table, batch_size, shuffle=True, seed=3, pad_to_bucket=True, **inputs)
        plan = batches.plan_epoch(1)
        assert [rows.tolist() for rows in plan] == [rows.tolist() for rows in batches.plan_epoch(1)]
        assert [rows.tolist() for rows in plan] != [rows.tolist() for rows in batches.plan_epoch(2)]
        whole = [rows for rows in plan if len(rows) == batches.plan_batch_size]
        assert whole and batches.plan_batch_size == (2 if kind == "grid" else batch_size)
        for rows in whole:
            (first, tokens), targets = batches.load_part(rows)
            half = batches.plan_batch_size // 2
            parts = [batches.load_part(rows, slice(0, half)), batches.load_part(rows, slice(half, 2 * half))]
            np.testing.assert_array_equal(np.concatenate([part[0][0] for part in parts]), first, err_msg=kind)
            np.testing.assert_array_equal(np.concatenate([part[0][1] for part in parts]), tokens, err_msg=kind)
            np.testing.assert_array_equal(np.concatenate([part[1] for part in parts]), targets, err_msg=kind)


@pytest.mark.heavy
def test_grid_batches_hold_each_image_once_with_all_its_captions():
    split = captions.CaptionSplit("train", [f"{i}.jpg" for i in range(5)],
                                  [["a b"] * 3, ["a b c d e"] * 2, ["a"] * 3, ["b c"] * 3, ["a b c"]], Path("x"))
    vocabulary = captions.Vocabulary.from_captions(["a b c d e"], 1, 10)
    table = caption_batches.CaptionTable(split, vocabulary)
    grids = np.arange(5, dtype=np.float16)[:, None, None] * np.ones((5, 2, 3), np.float16)
    for pad_to_bucket in (False, True):  # padded to the batch's longest, or to its bucket's boundary
        batches = caption_batches.CaptionBatches(table, 6, shuffle=True, seed=1, features=grids, pad_to_bucket=pad_to_bucket)
        seen = []
        for index in range(len(batches)):
            (grid, tokens), targets = batches[index]
            images = grid[:, 0, 0].astype(int).tolist()
            seen += images
            assert grid.dtype == np.float32 and tokens.shape == (3 * len(images), targets.shape[1])
            longest = 0
            for row, image in enumerate(np.repeat(images, 3)):  # image-major, 3 rows per image
                k = row % 3
                if k < table.count[image]:
                    ids = table.ids[table.first[image] + k]
                    n = table.lengths[table.first[image] + k] - 1
                    longest = max(longest, n)
                    assert tokens[row, :n].tolist() == ids[:n].tolist()
                    assert targets[row, :n].tolist() == ids[1:n + 1].tolist()
                    assert not tokens[row, n:].any() and not targets[row, n:].any()
                else:  # an image with fewer captions: an empty row, all padding
                    assert not tokens[row].any() and not targets[row].any()
            assert targets.shape[1] == (8 if pad_to_bucket else longest)  # the first bucket: < 9 steps
        assert sorted(seen) == list(range(5))
    assert [caption_batches.bucket_steps(n, 30) for n in (1, 8, 9, 10, 11, 21, 22, 29)] == [8, 8, 10, 10, 12, 21, 30, 30]
    assert caption_batches.bucket_steps(5, 6) == 6  # never beyond the table's captions
    # fit over batches of different images and caption lengths (on TensorFlow: through tf.data)
    keras.utils.set_random_seed(0)
    decoder = cap.build_attention_decoder(len(vocabulary), (2, 3), 8, 8, 8, 1.0, 0.0)
    cap.compile_captioner(decoder, keras.optimizers.Adam())
    history = decoder.fit(caption_batches.feature_caption_batches(grids, table, 6, shuffle=True), epochs=2, verbose=0)
    assert len(history.history["loss"]) == 2 and np.isfinite(history.history["loss"]).all()
    # Keras fixes a dataset's shapes from its first two batches: here equal, the third longer
    split = captions.CaptionSplit("train", ["0.jpg", "1.jpg", "2.jpg"], [["a b"] * 3, ["b a"] * 3, ["a b c d e"] * 3],
                                  Path("x"))
    table = caption_batches.CaptionTable(split, vocabulary)
    history = decoder.fit(caption_batches.feature_caption_batches(grids[:3], table, 3), epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all()


@pytest.mark.backend_independent
def test_cider_d_reward_is_the_coco_code_on_its_own_corpus_whatever_the_batch():
    from pycocoevalcap.cider.cider import Cider

    references = [["a dog runs on the grass", "a brown dog running", "the dog is on the green grass"],
                  ["two children play in the water", "kids splash in a pool", "two kids are swimming"],
                  ["a man rides a red bike", "a cyclist on a road", "a man on a bicycle"],
                  ["a dog jumps into the water", "a wet dog in a lake", "a dog is swimming"]]
    candidates = ["a dog runs on the grass", "a dog in the water", "a man on a red bike", "a man"]
    coco, per_image = Cider().compute_score(dict(enumerate(references)), {i: [c] for i, c in enumerate(candidates)})
    scorer = captions.CiderD(references)
    np.testing.assert_allclose(scorer.scores(range(4), candidates), per_image, rtol=1e-12)
    assert scorer.scores([3], [candidates[3]])[0] == pytest.approx(per_image[3])  # the corpus's idf, not the batch's
    assert scorer.scores([1, 1], candidates[:2]).tolist() == pytest.approx(
        [scorer.scores([1], [candidates[0]])[0], per_image[1]])
    with pytest.raises(ValueError, match="at least one reference"):
        captions.CiderD([["a caption"], []])


class WordCount:
    """A reward for tests: the number of words (rewards differ, so advantages do)."""

    def scores(self, images, texts):
        return np.array([len(text.split()) for text in texts], np.float64)


@pytest.mark.usefixtures("stand_in_backbones")  # the decoder, not Xception
@pytest.mark.parametrize("decoder", ["show-and-tell", "attention"])
def test_self_critical_batches_weight_each_sampled_caption_by_its_advantage(decoder):
    model = tiny_captioner("merge", vocabulary_size=12, decoder=decoder)
    vocabulary = captions.Vocabulary([*captions.SPECIAL_TOKENS, *"abcdefgh"], max_length=5)
    grid = decoder == "attention"
    rng = np.random.default_rng(5)
    image_features = rng.normal(0, 3, (5, 4, 2048) if grid else (5, 2048)).astype(np.float32)
    batches = caption_batches.SelfCriticalBatches(StepDecoder(model), image_features, WordCount(), vocabulary,
                                      images_per_batch=2, samples=4, seed=0, pad_to_bucket=False)
    assert len(batches) == 3
    (first, tokens), targets, weights = batches[0]
    images = batches.order[:2]
    np.testing.assert_array_equal(first, image_features[images] if grid else np.repeat(image_features[images], 4, 0))
    lengths = (targets != PAD_ID).sum(axis=1)
    rewards = np.array([len(vocabulary.decode(row).split()) for row in targets], np.float64)
    assert batches.rewards == rewards.tolist()
    for row, length in enumerate(lengths):
        assert tokens[row, 0] == START_ID and tokens[row, 1:length].tolist() == targets[row, :length - 1].tolist()
        assert (tokens[row, length:] == PAD_ID).all() and (targets[row, length:] == PAD_ID).all()
        others = np.delete(rewards.reshape(2, 4)[row // 4], row % 4).mean()  # the other samples' mean
        np.testing.assert_allclose(weights[row, :length], rewards[row] - others, rtol=1e-6)
        assert (weights[row, length:] == 0).all()
    np.testing.assert_allclose(weights[:, 0].reshape(2, 4).sum(axis=1), 0, atol=1e-5)
    with pytest.raises(ValueError, match="samples=1"):
        caption_batches.SelfCriticalBatches(StepDecoder(model), image_features, WordCount(), vocabulary, 2, samples=1)


@pytest.mark.usefixtures("stand_in_backbones")  # the decoder, not Xception
def test_self_critical_training_samples_from_the_decoder_as_it_trains():
    """Each batch is sampled with the weights of the last train step (on JAX, where ``fit`` keeps
    them in its own state, through the callback's sync), and its reward rises."""
    model = tiny_captioner("merge", vocabulary_size=12)
    vocabulary = captions.Vocabulary([*captions.SPECIAL_TOKENS, *"abcdefgh"], max_length=5)
    image_features = np.ones((1, 2048), np.float32)
    decoder = StepDecoder(model)
    batches = caption_batches.SelfCriticalBatches(decoder, np.repeat(image_features, 4, 0), WordCount(), vocabulary,
                                      images_per_batch=1, samples=8, seed=0)
    embeddings = []
    start = decoder.start
    decoder.start = lambda features: embeddings.append(start(features)[2][0]) or start(features)
    cap.compile_self_critical(model.get_layer("decoder"), keras.optimizers.Adam(0.05))
    callback = caption_batches.SelfCriticalValidation(batches, image_features, [["a b c d e"]])
    history = model.get_layer("decoder").fit(batches.fit_input(), epochs=3, verbose=0, callbacks=[callback])
    # 4 batches an epoch (JAX's fit draws one more first, to build); validation's search is compiled whole
    assert len(embeddings) in (12, 13)
    changed = [not np.allclose(a, b) for a, b in zip(embeddings, embeddings[1:])]
    assert sum(changed) >= 11, changed  # each batch sampled after a train step, from its weights
    assert history.history["reward"][-1] > history.history["reward"][0]
    assert 0 <= history.history["val_cider_d"][-1]


@pytest.mark.usefixtures("stand_in_backbones")  # the decoder's state, not Xception
def test_step_decoder_decodes_with_the_weights_as_they_are_now():
    """A ``StepDecoder`` made before the weights change uses the new weights (on JAX its jitted
    steps take them as arguments, not as constants traced once)."""
    model = tiny_captioner("merge", vocabulary_size=12)
    image_features = np.random.default_rng(6).normal(0, 3, (2, 2048)).astype(np.float32)
    decoder = StepDecoder(model)
    tokens = np.full(2, START_ID, np.int32)
    before, _ = decoder.step(tokens, decoder.start(image_features))
    head = model.get_layer("decoder").get_layer("next_word")
    head.kernel.assign(head.kernel * 3.0)
    after, _ = decoder.step(tokens, decoder.start(image_features))
    fresh, _ = StepDecoder(model).step(tokens, StepDecoder(model).start(image_features))
    assert not np.allclose(before, after)
    np.testing.assert_allclose(after, fresh, rtol=1e-5, atol=1e-6)


@pytest.mark.usefixtures("stand_in_backbones")  # the decoder's state, not Xception
@pytest.mark.parametrize("inject, decoder", DECODERS)
def test_step_decoding_carries_the_state_like_the_whole_model(inject, decoder):
    """Greedy decoding step by step picks, at every step, the argmax of the full model run on the
    words decoded so far (teacher forcing): the LSTM state is carried, not restarted."""
    model = tiny_captioner(inject, vocabulary_size=12, decoder=decoder)
    images = np.random.default_rng(4).uniform(0, 255, (3, 71, 71, 3)).astype(np.float32)
    image_features = model.get_layer("encoder").predict(images, verbose=0)
    found = StepDecoder(model).captions(image_features, beam_size=1, max_length=5)
    for row, words in enumerate(found):
        tokens = np.array([[START_ID] + words[:-1]], np.int32)
        probabilities = model.predict([images[row:row + 1], tokens], verbose=0)[0].astype(np.float64)
        probabilities[:, [PAD_ID, START_ID, UNK_ID]] = 0
        assert probabilities.argmax(axis=1).tolist() == words


# ----------------------------------------------------------------------------- text

def test_vocabulary_counts_training_words_and_round_trips(tmp_path):
    train = ["A dog runs.", "a dog sits", "The DOG, a cat!", "zebra"]
    vocabulary = captions.Vocabulary.from_captions(train, min_word_count=2, max_length=3)
    assert vocabulary.tokens == ["", "<unk>", "<start>", "<end>", "a", "dog"]
    ids, lengths = vocabulary.encode(["a dog sleeps here today", "Dog!"])
    assert ids.tolist() == [[START_ID, 4, 5, UNK_ID, END_ID], [START_ID, 5, END_ID, 0, 0]]
    assert lengths.tolist() == [5, 3]
    assert vocabulary.decode([4, 5, END_ID, 4]) == "a dog"
    vocabulary.save(tmp_path / "vocabulary.json")
    loaded = captions.Vocabulary.load(tmp_path / "vocabulary.json")
    assert loaded.tokens == vocabulary.tokens and loaded.max_length == 3
    with pytest.raises(ValueError, match="min_word_count=0"):
        captions.Vocabulary.from_captions(train, min_word_count=0)
    with pytest.raises(ValueError, match="max_length=0"):
        captions.Vocabulary.from_captions(train, max_length=0)


# ----------------------------------------------------------------------------- data

def test_flickr8k_layout_is_read_with_its_official_split(flickr):
    splits = captions.load_caption_splits(flickr)
    assert {name: len(split) for name, split in splits.items()} == {"train": 9, "val": 3, "test": 3}
    assert splits["val"].paths[0].name == "1009_red.jpg"
    assert splits["train"].captions[1] == colour_captions("blue")


def test_coco_layout_is_read(tmp_path):
    splits = captions.load_caption_splits(make_coco(tmp_path / "coco", with_test=True))
    assert {name: len(split) for name, split in splits.items()} == {"train": 6, "val": 3, "test": 3}
    assert splits["train"].captions[2] == colour_captions("green")[:3]
    assert splits["val"].paths[0] == tmp_path / "coco" / "val2017" / "000000000000.jpg"


@pytest.mark.parametrize("damage, message", [
    (lambda root: _edit(root / captions.FLICKR8K_TOKENS, 3, "1000_red.jpg#3 a caption without tab"),
     r"Flickr8k.token.txt:4: no tab"),
    (lambda root: _edit(root / captions.FLICKR8K_TOKENS, 0, "#0\tno image name"), r"Flickr8k.token.txt:1: no image name"),
    (lambda root: (root / "Flicker8k_Dataset" / "1010_blue.jpg").unlink(),
     r"Flickr_8k.devImages.txt:2: image 1010_blue.jpg is listed but not in"),
    (lambda root: _edit(root / "Flickr_8k.testImages.txt", 0, "9999_x.jpg"),
     r"Flickr_8k.testImages.txt:1: image 9999_x.jpg has no caption"),
    (lambda root: (root / "Flickr_8k.devImages.txt").write_text("\n"), r"Flickr_8k.devImages.txt: the val split is empty"),
])
def test_bad_flickr8k_input_is_refused_naming_file_and_line(flickr, damage, message):
    damage(flickr)
    with pytest.raises(captions.DatasetError, match=message):
        captions.load_caption_splits(flickr)


def _edit(path, line, text):
    lines = path.read_text().splitlines()
    lines[line] = text
    path.write_text("\n".join(lines) + "\n")


def test_coco_without_annotations_is_refused(tmp_path):
    root = make_coco(tmp_path / "coco")
    path = root / "annotations" / "captions_val2017.json"
    path.write_text(json.dumps({"images": []}))
    with pytest.raises(captions.DatasetError, match="captions_val2017.json: no 'annotations' list"):
        captions.load_caption_splits(root)


def test_multi_worker_is_refused_where_it_cannot_train_in_one_line(flickr, tmp_path, caplog):
    """``--distribute multi-worker``: on TensorFlow (JAX trains the captioner across processes), and
    with phase 3 (it samples on one process), refused before anything is read or written."""
    argv = ["--data-dir", str(flickr), "--output-dir", str(tmp_path / "run"), *TINY, "--distribute", "multi-worker"]
    if keras.backend.backend() == "tensorflow":
        assert cap.main(argv) == 1
        assert "--distribute multi-worker trains the captioner across processes on JAX" in caplog.text
    else:
        assert cap.main([*argv, "--self-critical-epochs", "1"]) == 1
        assert "--self-critical-epochs: phase 3 samples captions on one process" in caplog.text
    assert len([r for r in caplog.records if r.levelname == "ERROR"]) == 1 and not (tmp_path / "run").exists()
    with pytest.raises(SystemExit) as exit_:  # not a choice of the captioner's
        cap.main([*argv[:-2], "--distribute", "mirrored"])
    assert exit_.value.code == 2


def test_failed_download_names_the_offline_option(monkeypatch, tmp_path, caplog):
    def no_internet(*args, **kwargs):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(keras.utils, "get_file", no_internet)
    assert cap.main(["--download", "--output-dir", str(tmp_path / "run"), *TINY]) == 1
    assert "Could not download" in caplog.text and "--data-dir" in caplog.text
    assert cap.main(["--output-dir", str(tmp_path / "run"), *TINY]) == 1
    assert "Pass --data-dir DIR" in caplog.text


def test_nothing_is_trained_on_an_undecodable_image(flickr, tmp_path, caplog):
    (flickr / "Flicker8k_Dataset" / "1004_blue.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    out = tmp_path / "run"
    assert cap.main(["--data-dir", str(flickr), "--output-dir", str(out), *TINY]) == 1
    assert "1004_blue.jpg" in caplog.text and "cannot be decoded" in caplog.text
    assert not any(out.glob("*_log.csv"))


# ----------------------------------------------------------------------------- metrics

@pytest.mark.backend_independent
def test_caption_scores_match_hand_computed_bleu():
    # candidate "a dog runs on the grass" vs "a dog runs on grass": 1- to 4-gram precisions
    # 5/6, 3/5, 2/4, 1/3, no brevity penalty (6 words > 5).
    scores = captions.caption_scores([["a dog runs on grass"], ["a cat sits on the mat"]],
                                     ["a dog runs on the grass", "a cat sits on the mat"], meteor=False)
    # corpus-level: the clipped n-gram counts of both images are summed
    p = [(5 + 6) / (6 + 6), (3 + 5) / (5 + 5), (2 + 4) / (4 + 4), (1 + 3) / (3 + 3)]
    expected = [math.exp(sum(math.log(x) for x in p[:n]) / n) for n in range(1, 5)]
    assert [scores[f"bleu{n}"] for n in range(1, 5)] == pytest.approx(expected, abs=1e-6)
    assert scores["cider_d"] > 0 and scores["meteor"] is None
    perfect = captions.caption_scores([["a dog runs"]], ["a dog runs"], meteor=False)
    assert perfect["bleu1"] == pytest.approx(1.0) and perfect["bleu3"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="equal length"):
        captions.caption_scores([["a"]], [])



@METEOR
@pytest.mark.skipif(shutil.which("java") is None, reason="METEOR needs java")
@pytest.mark.backend_independent
@pytest.mark.heavy
def test_meteor_starts_java_once_per_process():
    references, candidates = [["a dog runs on grass"], ["a cat sits on the mat"]], ["a dog runs", "a cat sits"]
    first = captions.caption_scores(references, candidates)["meteor"]
    scorer = captions._meteor()
    assert 0 < first < 1
    assert captions.caption_scores(references, candidates[::-1])["meteor"] < first  # the captions are read
    assert captions._meteor() is scorer and scorer.meteor_p.poll() is None  # one Java process scored both


@pytest.mark.backend_independent
def test_a_meteor_scorer_whose_process_died_is_replaced(monkeypatch, caplog):
    import functools
    import threading

    from pycocoevalcap.meteor.meteor import Meteor

    def dead_scorer():  # a real scorer object whose process has exited
        scorer = Meteor.__new__(Meteor)
        scorer.meteor_p = subprocess.Popen([sys.executable, "-c", "pass"], stdin=subprocess.PIPE,
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        scorer.meteor_p.wait()
        scorer.lock = threading.Lock()
        made.append(scorer)
        return scorer

    made = []
    monkeypatch.setattr(captions, "_meteor", functools.cache(dead_scorer))
    for attempt in (1, 2):
        caplog.clear()
        assert captions.caption_scores([["a dog"]], ["a dog"], meteor=True)["meteor"] is None
        assert "METEOR not computed" in caplog.text
        assert len(made) == attempt and not made[-1].lock.locked()  # not reused; its lock freed for __del__


# ----------------------------------------------------------------------------- whole runs

@METEOR
@pytest.mark.usefixtures("stand_in_backbones")  # the attention decoder's run, not Xception
@pytest.mark.heavy
def test_attention_run_caches_grids_in_float16_and_draws_where_it_looks(flickr, tmp_path, caplog, capsys):
    out = tmp_path / "run"
    caplog.set_level(logging.INFO)
    assert cap.main(["--data-dir", str(flickr), "--output-dir", str(out), *TINY, "--decoder", "attention",
                     "--attention-dim", "8", "--epochs", "1", "--fine-tune-epochs", "1", "--self-critical-epochs", "2",
                     "--self-critical-batch-size", "3", "--self-critical-samples", "3", "--beam-size", "2"]) == 0
    run = rundir.RunDir(out)
    cached = np.load(next(run.features.glob("train-*.npy")))
    assert cached.dtype == np.float16 and cached.shape == (9, 4, 2048)  # 71 px: a 2 x 2 grid
    fine_tuned = keras.saving.load_model(run.best("phase2")).get_layer("encoder")  # phase 3 reads its features
    key = features.cache_key(fine_tuned, captions.load_caption_splits(flickr)["train"].paths, " as float16")[:20]
    assert (run.features / f"train-{key}.npy").is_file()
    assert "MB on disk" in caplog.text
    history = rundir.read_history(run.log("phase3"))  # self-critical training: 3 batches of 3 images x 3 samples
    assert history["epoch"] == [0.0, 1.0] and all(0 <= value < 11 for value in history["reward"] + history["val_cider_d"])
    assert run.done("phase3").is_file() and run.curves("phase3").is_file()
    metrics = json.loads(run.metrics.read_text())
    assert 0 <= metrics["beam"]["bleu4"] <= 1 and metrics["num_images"] == 3
    assert metrics["model"] == str(run.best("phase3"))
    with Image.open(run.captions_grid) as grid:  # 3 images (one row) and 3 rows of attention maps
        assert grid.size[1] > 2.5 * grid.size[0] / 4 * 1.3
    model, vocabulary = cap.load_captioner(run.best("phase3"))
    assert isinstance(model.get_layer("decoder").get_layer("lstm"), SoftAttentionLSTM)
    capsys.readouterr()
    images = flickr / "Flicker8k_Dataset"
    maps = tmp_path / "maps"
    photos = sorted(images.glob("*.jpg"))[:3]
    namesake = tmp_path / "elsewhere" / photos[0].name  # another photo of the same name: numbered, and said
    namesake.parent.mkdir()
    shutil.copyfile(photos[1], namesake)
    with caplog.at_level(logging.INFO):
        assert cap.main(["caption", "--model", str(run.best("phase3")), "--attention-maps", str(maps),
                         *map(str, photos), str(namesake)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4
    assert sorted(p.stem for p in maps.glob("*.png")) == sorted([p.stem for p in photos] + [f"{photos[0].stem}_2"])
    assert f"attention map of {namesake}: {photos[0].stem}_2.png ({photos[0].stem}.png is {photos[0]}'s)" in caplog.text
    decoder = StepDecoder(model)
    grids = caption_evaluation.encode_images(model, photos, verbose=0)
    ids = decoder.captions(grids, 1, vocabulary.max_length)
    for weights, words in zip(decoder.attention_weights(grids, ids), ids):
        assert weights.shape == (len([w for w in words if w != END_ID]), 4)
        np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-5)
    with Image.open(next(maps.glob("*.png"))) as picture:
        assert picture.size[0] > 300
    # a show-and-tell captioner has no attention: one line, nothing written
    tiny_captioner("pre").save(tmp_path / "plain.keras")
    vocabulary.save(tmp_path / "vocabulary.json")
    caplog.clear()
    assert cap.main(["caption", "--model", str(tmp_path / "plain.keras"), "--attention-maps",
                     str(tmp_path / "none"), str(photos[0])]) == 1
    assert "--attention-maps needs a captioner trained with --decoder attention" in caplog.text
    assert not (tmp_path / "none").exists()


@METEOR
@pytest.mark.usefixtures("stand_in_backbones")  # the run, not Xception (whose captioner: test_seed_size_captioners)
@pytest.mark.heavy
def test_interrupted_two_phase_run_resumes_then_writes_every_output_evaluates_and_captions(
        flickr, tmp_path, monkeypatch, caplog, capsys):
    """Show-and-tell (the default decoder), killed in phase 1's second epoch: other model flags are
    refused, the same command continues from the cache and the backup, trains phase 2 and writes
    every output; ``evaluate`` and ``caption`` on its model. (An uninterrupted two-phase run: the
    attention run below.)"""
    out = tmp_path / "run"
    args = ["--data-dir", str(flickr), "--output-dir", str(out), *TINY, "--epochs", "3", "--fine-tune-epochs", "1",
            "--skip-image-check"]
    kill_at_batch(monkeypatch, 12)  # 6 batches per epoch (bucketed): inside epoch 2
    with pytest.raises(Killed):
        cap.main(args)
    monkeypatch.undo()
    assert rundir.read_history(out / "phase1_log.csv")["epoch"] == [0.0]
    caplog.set_level(logging.INFO)
    assert cap.main([*args, "--lstm-units", "32"]) == 1
    assert "--lstm-units 16 -> 32" in caplog.text
    caplog.clear()
    assert cap.main(args) == 0
    assert "read from the cache" in caplog.text and "resuming after 1 completed epochs" in caplog.text
    assert rundir.read_history(out / "phase1_log.csv")["epoch"] == [0.0, 1.0, 2.0]

    run = rundir.RunDir(out)
    for phase in ("phase1", "phase2"):
        assert run.best(phase).is_file() and run.done(phase).is_file() and run.curves(phase).is_file()
        assert len(rundir.read_history(run.log(phase))["val_loss"]) == (3 if phase == "phase1" else 1)
    assert sorted(p.name.split("-")[0] for p in run.features.glob("*.npy")) == ["train", "val"]
    assert json.loads(run.args.read_text())["inject"] == "pre"
    vocabulary = captions.Vocabulary.load(run.vocabulary)
    assert {"red", "blue", "green", "picture"} <= set(vocabulary.tokens)
    metrics = json.loads(run.metrics.read_text())
    for decoding in ("greedy", "beam"):
        for key in ("bleu1", "bleu4", "cider_d", "distinct_captions", "vocabulary_used", "bleu4_shuffled"):
            assert 0 <= metrics[decoding][key] < 11
    assert metrics["split"] == "test" and metrics["num_images"] == 3
    generated = json.loads(run.captions.read_text())
    assert len(generated) == 3 and set(generated[0]) == {"image", "greedy", "beam", "references"}
    with Image.open(run.captions_grid) as grid:
        assert grid.size[0] > 200
    # phase 1's model is the whole captioner (its best checkpoint takes images)
    assert keras.saving.load_model(run.best("phase1")).name == "captioner"

    capsys.readouterr()
    assert cap.main(["evaluate", "--model", str(run.best("phase2")), "--data-dir", str(flickr),
                     "--json", str(tmp_path / "m.json")]) == 0
    again = json.loads((tmp_path / "m.json").read_text())
    assert again["beam"]["bleu4"] == pytest.approx(metrics["beam"]["bleu4"], abs=1e-6)
    assert "BLEU-4" in capsys.readouterr().out
    assert cap.main(["caption", "--model", str(run.best("phase2")), "--beam-size", "2",
                     str(flickr / "Flicker8k_Dataset" / "1000_red.jpg"), str(flickr / "Flicker8k_Dataset")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 16 and lines[0].startswith(str(flickr / "Flicker8k_Dataset" / "1000_red.jpg") + ":")
    words = {w for line in lines for w in line.rsplit(":", 1)[1].split()}
    assert words <= set(vocabulary.tokens[4:])


@METEOR
@pytest.mark.usefixtures("stand_in_backbones")  # about the training core, not Xception
@pytest.mark.heavy
def test_coco_format_trains_and_evaluates_on_val_without_test(tmp_path, caplog):
    out = tmp_path / "run"
    assert cap.main(["--data-dir", str(make_coco(tmp_path / "coco")), "--output-dir", str(out), *TINY,
                     "--epochs", "1", "--fine-tune-epochs", "0", "--beam-size", "2"]) == 0
    assert json.loads((out / "metrics.json").read_text())["split"] == "val"
    assert "no labelled test split" in caplog.text


def test_help_answers_without_tensorflow():
    code = ("import sys, runpy; sys.argv = ['captioning.py', 'train', '--help']\n"
            "try:\n    runpy.run_path('captioning.py', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "assert 'tensorflow' not in sys.modules, 'tensorflow imported'\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0 and "--beam-size" in result.stdout, result.stderr[-1000:]
