"""Scoring a captioner: its captions of a split, greedy and by beam search, against the
references (the COCO caption evaluation code, ``helpers.captions.caption_scores``), the run's
report files, and the attention decoder's maps."""

import logging
from pathlib import Path

import numpy as np

from helpers import captions, features, reports, training
from helpers.backbones import XCEPTION
from helpers.decoding import StepDecoder

logger = logging.getLogger(__name__)

ATTENTION_IN_GRID = 3  # images whose attention maps join the evaluation's captions.png


def grid_shape(model):
    """``(rows, columns)`` of an attention captioner's feature grid (10 x 10 at 299 px)."""
    return tuple(model.get_layer("encoder").get_layer(XCEPTION.name).output_shape[1:3])


def write_attention_maps(model, decoder, vocabulary, paths, image_features, ids, folder):
    """Writes ``folder/<image name>.png`` for each image: its caption's words and, per word, where
    the attention decoder looked (``helpers.reports.plot_attention``); returns the files. Images of
    one name in different folders get ``<name>_2.png``, ``<name>_3.png``, ..., each logged with its image.

    Args:
        decoder: the captioner's ``StepDecoder``.
        image_features: ``(num_images, positions, 2048)`` the encoder's grids of ``paths``.
        ids: per image, the caption's word ids (``StepDecoder.captions``).

    Raises:
        helpers.errors.UsageError: the captioner has no attention decoder.
    """
    shape, folder = grid_shape(model), Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written, names = [], {}
    for first in range(0, len(paths), 32):
        chunk = ids[first:first + 32]
        weights = decoder.attention_weights(image_features[first:first + 32], chunk)
        for path, words, weight in zip(paths[first:first + 32], chunk, weights):
            name, number = Path(path).stem, 1
            while name in names:  # two images of the same name in different folders: numbered, and said
                number += 1
                name = f"{Path(path).stem}_{number}"
            if number > 1:
                logger.info("attention map of %s: %s.png (%s.png is %s's)", path, name, Path(path).stem,
                            names[Path(path).stem])
            names[name] = path
            written.append(reports.plot_attention(path, vocabulary.decode(words).split(), weight, shape,
                                                  folder / f"{name}.png"))
    return written


def encode_images(model, paths, batch_size=32, workers=2, verbose=None):
    """The model's encoder output for each image file: ``(num_images, 2048)`` float32."""
    encoder = model.get_layer("encoder")
    dataset = features.ImageBatches(paths, encoder.input_shape[1], batch_size, workers=workers)
    verbose = training.progress_verbosity() if verbose is None else verbose
    return np.asarray(encoder.predict(dataset, verbose=verbose), np.float32)


def evaluate_captioner(model, vocabulary, split, beam_size=3, batch_size=64, workers=2):
    """Captions every image of ``split`` greedily and with beam search, and scores both.

    Returns:
        ``(metrics, generated)``: ``metrics`` holds ``split``, ``num_images``, ``greedy`` and
        ``beam`` (each ``captions.caption_scores`` plus ``distinct_captions``, the share of
        different captions over the images, ``vocabulary_used``, the different words they
        use, and ``bleu4_shuffled``, BLEU-4 with the images shuffled against their
        references); ``generated`` is ``{"greedy": [...], "beam": [...]}`` caption strings, and
        for an attention captioner ``"attention"``: ``(grid_shape, [(path, words, weights)])``
        for the first ``ATTENTION_IN_GRID`` images (``helpers.reports.plot_captions``).
    """
    image_features = encode_images(model, split.paths, batch_size, workers)
    decoder = StepDecoder(model)
    references = captions.reference_texts(split.captions)
    shuffled = np.random.default_rng(0).permutation(len(references))
    metrics, generated = {"split": split.name, "num_images": len(split), "beam_size": beam_size}, {}
    for name, width in (("greedy", 1), ("beam", beam_size)):
        found = decoder.captions(image_features, width, vocabulary.max_length)
        texts = [vocabulary.decode(ids) for ids in found]
        scores = captions.caption_scores(references, texts)
        scores["bleu4_shuffled"] = captions.caption_scores([references[i] for i in shuffled], texts,
                                                           meteor=False)["bleu4"]
        scores["distinct_captions"] = len(set(texts)) / len(texts)
        scores["vocabulary_used"] = len({word for text in texts for word in text.split()})
        metrics[name], generated[name] = scores, texts
        if name == "beam" and decoder.attention:  # where the beam captions of the first images looked
            ids = found[:ATTENTION_IN_GRID]
            generated["attention"] = (grid_shape(model), list(zip(
                split.paths[:ATTENTION_IN_GRID], [text.split() for text in texts[:ATTENTION_IN_GRID]],
                decoder.attention_weights(image_features[:ATTENTION_IN_GRID], ids))))
    return metrics, generated


def format_metrics(metrics):
    """The report: one line per decoding."""
    lines = [f"split: {metrics['split']} ({metrics['num_images']} images)"]
    for name in ("greedy", "beam"):
        s = metrics[name]
        label = "greedy" if name == "greedy" else f"beam {metrics['beam_size']}"
        meteor = f" METEOR {s['meteor']:.3f}" if s.get("meteor") is not None else ""
        lines.append(f"{label:>7}: BLEU-1 {s['bleu1']:.3f} BLEU-2 {s['bleu2']:.3f} BLEU-3 {s['bleu3']:.3f} "
                     f"BLEU-4 {s['bleu4']:.3f} CIDEr-D {s['cider_d']:.3f}{meteor} | distinct captions "
                     f"{100 * s['distinct_captions']:.0f}%, {s['vocabulary_used']} words, BLEU-4 on shuffled "
                     f"images {s['bleu4_shuffled']:.3f}")
    return "\n".join(lines)


def save_caption_evaluation(run, metrics, generated, split, model_path):
    """Writes ``metrics.json``, ``captions.json`` and the ``captions.png`` grid, and prints the report."""
    metrics["model"] = str(model_path)
    reports.write_json(run.metrics, metrics)
    reports.write_json(run.captions, [{"image": str(path), "greedy": g, "beam": b, "references": refs}
                                      for path, g, b, refs in zip(split.paths, generated["greedy"], generated["beam"],
                                                                  split.captions)])
    reports.plot_captions(split.paths[:12], generated["beam"][:12], [refs[0] for refs in split.captions[:12]],
                          run.captions_grid, f"{split.name}: beam {metrics['beam_size']} (top) and a reference",
                          attention=generated.get("attention"))
    print(format_metrics(metrics))
    print(f"outputs in {run.path}")
