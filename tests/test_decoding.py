"""helpers/decoding.py: the one beam search (against an exhaustive search, eager and compiled
alike), greedy decoding as its width 1, and sampling, on Markov chains of a tiny vocabulary."""

import itertools
import math

import numpy as np
import pytest
from keras import ops

from helpers.captions import END_ID, PAD_ID, START_ID, UNK_ID
from helpers.decoding import StepDecoder, beam_search, caption_words, sample_search
from tests.test_captioning import DECODERS, tiny_captioner

A, B = 4, 5  # the two words; 0-3 are padding, <unk>, <start> and <end>


def table(rows, vocabulary=6):
    """``rows``: {word: {next word: probability}}; other entries get nothing."""
    probabilities = np.zeros((vocabulary, vocabulary))
    for word, nexts in rows.items():
        for next_word, p in nexts.items():
            probabilities[word, next_word] = p
    return probabilities


def chains(*tables):
    """``beam_search``'s ``start`` and ``step`` for Markov chains, one per image: the next word's
    log-probabilities depend on the image and the last word only (the state carries the image)."""
    log_tables = np.log(np.maximum(np.stack(tables), 1e-30)).astype(np.float32)
    vocabulary = log_tables.shape[-1]
    flat = ops.convert_to_tensor(log_tables.reshape(-1, vocabulary))

    def start(image_features):
        return (ops.cast(image_features[:, 0], "int32"),), ()

    def step(tokens, state, constants):
        return ops.take(flat, state[0] * vocabulary + tokens, axis=0), state

    return start, step, np.arange(len(tables), dtype=np.float32)[:, None]


def search(tables, beam_size, max_length, length_penalty=1.0):
    start, step, images = chains(*tables)
    ids, scores = beam_search(start, step, images, beam_size, max_length, length_penalty)
    return caption_words(ids), ops.convert_to_numpy(scores)


TRAP = table({START_ID: {A: 0.6, B: 0.4}, A: {END_ID: 0.4, A: 0.3, B: 0.3}, B: {END_ID: 0.95, A: 0.05}})


def test_beam_search_finds_a_more_probable_caption_than_greedy():
    (greedy,), (greedy_score,) = search([TRAP], 1, 5)
    (beam,), (beam_score,) = search([TRAP], 3, 5)
    assert greedy == [A, END_ID] and greedy_score == pytest.approx(math.log(0.6 * 0.4) / 2, rel=1e-5)
    assert beam == [B, END_ID] and beam_score == pytest.approx(math.log(0.4 * 0.95) / 2, rel=1e-5)


SHORT_OR_LONG = table({START_ID: {A: 0.5, B: 0.5}, A: {END_ID: 1.0}, B: {A: 0.9, END_ID: 0.1}})


def test_beam_search_length_penalty_trades_total_for_per_word_probability():
    # "A <end>": p 0.5 over 2 words; "B A <end>": p 0.45 over 3
    for penalty, expected, score in ((0.0, [A, END_ID], math.log(0.5)), (1.0, [B, A, END_ID], math.log(0.45) / 3),
                                     (2.0, [B, A, END_ID], math.log(0.45) / 9)):
        (found,), (found_score,) = search([SHORT_OR_LONG], 3, 5, length_penalty=penalty)
        assert found == expected and found_score == pytest.approx(score, rel=1e-5), penalty


def test_decoding_never_emits_padding_start_or_unk_and_stops_at_end():
    favours_specials = table({START_ID: {PAD_ID: 0.3, UNK_ID: 0.3, START_ID: 0.2, A: 0.2},
                              A: {UNK_ID: 0.5, END_ID: 0.3, A: 0.2}, END_ID: {A: 1.0}})
    for beam_size in (1, 2, 4):
        found, _ = search([favours_specials, favours_specials], beam_size, 10)
        assert found == [[A, END_ID], [A, END_ID]], beam_size


def test_without_end_the_best_unfinished_caption_is_returned():
    never_ends = table({START_ID: {A: 0.7, B: 0.3}, A: {A: 0.5, B: 0.5}, B: {B: 1.0}})
    (found,), (score,) = search([never_ends], 3, 4)
    assert found == [A, B, B, B] and score == pytest.approx(math.log(0.7 * 0.5) / 4, rel=1e-5)
    (greedy,), _ = search([never_ends], 1, 4)
    assert greedy == [A, A, A, A]


def exhaustive(probabilities, max_length, length_penalty):
    """The best caption of a Markov chain over every caption of A and B of at most
    ``max_length`` words (ended by <end>, or cut at ``max_length``), by normalised score."""
    best = (-math.inf, None)
    for words in range(1, max_length + 1):
        for sequence in itertools.product((A, B, END_ID), repeat=words):
            if END_ID in sequence[:-1] or (sequence[-1] != END_ID and words < max_length):
                continue
            total = sum(math.log(probabilities[a, b]) for a, b in zip((START_ID,) + sequence, sequence))
            best = max(best, (total / words ** length_penalty, list(sequence)), key=lambda item: item[0])
    return best


@pytest.mark.parametrize("length_penalty", [0.0, 0.7, 1.0, 2.0])
def test_a_beam_wider_than_every_caption_finds_the_exhaustive_search_best(length_penalty):
    """Four words at most over A and B: 15 captions end, 16 are cut, so a beam of 16 never
    drops a hypothesis nor stops early, and must find the best caption exhaustive search finds,
    for each of four random chains searched together (one per image)."""
    rng = np.random.default_rng(int(length_penalty * 10))
    tables = []
    for _ in range(4):
        probabilities = np.zeros((6, 6))
        for word in (START_ID, A, B):
            probabilities[word, [A, B, END_ID]] = rng.dirichlet(np.ones(3))
        tables.append(probabilities)
    found, scores = search(tables, 16, 4, length_penalty)
    for probabilities, words, score in zip(tables, found, scores):
        best_score, best_words = exhaustive(probabilities, 4, length_penalty)
        assert words == best_words and score == pytest.approx(best_score, rel=1e-4)


@pytest.mark.usefixtures("stand_in_backbones")  # the decoder, not Xception
@pytest.mark.parametrize("inject, decoder", DECODERS)
def test_the_compiled_search_is_the_eager_one(inject, decoder):
    """``StepDecoder.captions`` (a ``tf.function``, or jitted on JAX, batched and padded) finds the
    captions of ``beam_search`` run op by op, greedy and with a beam of 3."""
    model = tiny_captioner(inject, vocabulary_size=12, decoder=decoder)
    step_decoder = StepDecoder(model)
    shape = (5, 4, 2048) if decoder == "attention" else (5, 2048)
    image_features = np.random.default_rng(3).normal(0, 3, shape).astype(np.float32)
    for beam_size in (1, 3):
        compiled = step_decoder.captions(image_features, beam_size, max_length=6, batch_size=4)
        ids, _ = beam_search(step_decoder.graph_start, step_decoder.graph_step,
                             ops.convert_to_tensor(image_features), beam_size, 6)
        assert compiled == caption_words(ids), beam_size


@pytest.mark.backend_independent
def test_caption_words_keep_the_words_and_end_and_drop_the_padding():
    ids = np.array([[A, B, END_ID, 0, 0], [B, B, B, B, B], [END_ID, 0, 0, 0, 0]], np.int32)
    assert caption_words(ids) == [[A, B, END_ID], [B] * 5, [END_ID]]


def test_sampling_draws_each_word_from_the_decoder_distribution_until_end():
    """``sample_search`` (self-critical training's exploration): ``samples`` rows per image,
    image-major, each word drawn with the decoder's probability, 0 after ``<end>``."""
    chain = np.log(np.maximum(table({START_ID: {A: 0.7, B: 0.2, UNK_ID: 0.1}, A: {END_ID: 0.5, A: 0.5},
                                     B: {END_ID: 1.0}}), 1e-30))
    seen = []

    def step(tokens, state):
        seen.append(state[0][:, 0].copy())
        return chain[tokens], state

    state = (np.array([[10.0], [20.0]]),)  # one row per image
    ids = sample_search(step, state, 2, 3000, 6, np.random.default_rng(0))
    assert ids.shape == (6000, 6) and ids.dtype == np.int32
    assert seen[0].tolist() == [10.0] * 3000 + [20.0] * 3000  # image-major
    first = ids[:, 0]
    assert abs(np.mean(first == A) - 0.7 / 0.9) < 0.03 and abs(np.mean(first == B) - 0.2 / 0.9) < 0.03  # <unk> never
    assert set(np.unique(ids)) <= {PAD_ID, A, B, END_ID}
    for row in ids[:50]:
        end = row.tolist().index(END_ID) if END_ID in row else len(row)
        assert (row[end + 1:] == PAD_ID).all() and PAD_ID not in row[:end + 1].tolist()
    lengths = (ids[first == A] != PAD_ID).sum(axis=1)  # A, then A again with p 0.5 until <end>
    assert abs(np.mean(lengths == 2) - 0.5) < 0.04
