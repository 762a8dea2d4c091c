#!/usr/bin/env python
"""Show-and-tell against attention on the same Xception features: scores on the test split,
greedy and beam, with paired bootstrap confidence intervals of the difference. Either run may
be a finished one of its own (then its ``captions.json`` is compared as it is), e.g. the demo's
show-and-tell with its self-critical phase 3.

Run by hand, never part of pass/fail::

    python benchmarks/captioning_decoders.py --data-dir FLICKR8K --attention-run runs/attention \\
        --show-and-tell-run runs/show_and_tell [--weights PATH] [--epochs 10] [--fine-tune-epochs 0] \\
        [--resamples 1000] [--json FILE] [--markdown FILE]

1. ``--attention-run``: a finished ``captioning.py train --decoder attention`` run (its
   ``captions.json`` holds the greedy and beam captions of every test image).
2. ``--show-and-tell-run``: trained here unless it has finished already, with ``captioning.py
   train --inject merge`` (the demo's show-and-tell) and ``--epochs``/``--fine-tune-epochs``;
   its phase-1 feature cache is first written from the attention run's grid cache: Xception's
   average-pooled features are the mean of its feature grid over the positions, so both decoders
   learn from the same features, and Xception runs once (the grid is stored in float16: the
   means differ from a float32 pooling by about 1e-4 relative).
3. The choice: both runs' final models caption the val images from their own val caches,
   greedy and beam, BLEU-4 and CIDEr-D.
4. Both runs' test captions are scored with the COCO caption evaluation code (BLEU-4, CIDEr-D)
   and compared image by image: ``--resamples`` bootstrap resamples of the test images (the
   same draw for both decoders), the difference attention - show-and-tell recomputed on each
   (corpus BLEU-4 from per-image n-gram counts, as the COCO code sums them; CIDEr-D as the mean of
   per-image scores with the document frequencies of the whole test split), and the 2.5th and
   97.5th percentiles reported: a 95% interval that excludes 0 is a difference beyond the luck
   of which photos are in the test split.
"""

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

import captioning as cap  # noqa: E402
from helpers import captions, cli, features, rundir  # noqa: E402
from helpers.decoding import StepDecoder  # noqa: E402


def seed_pooled_cache(attention_run, args):
    """Writes the show-and-tell run's phase-1 cache (train, val) as the means of the attention
    run's grids, under the key ``captioning.py`` computes for its own encoder."""
    splits = captions.load_caption_splits(args.data_dir)
    vocabulary = captions.Vocabulary.load(rundir.RunDir(attention_run).vocabulary)
    model = cap.build_captioner(vocabulary_size=len(vocabulary), weights=args.weights,
                                **cli.model_arguments(args, cap.MODEL_ARGUMENTS))
    encoder = model.get_layer("encoder")
    folder = rundir.RunDir(args.output_dir).features
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("train", "val"):
        grids = list(rundir.RunDir(attention_run).features.glob(f"{name}-*.npy"))
        if len(grids) != 1:
            raise SystemExit(f"{attention_run} has {len(grids)} {name} grid caches; it needs one.")
        grid = np.load(grids[0], mmap_mode="r")
        pooled = np.concatenate([np.asarray(grid[i:i + 500], np.float32).mean(axis=1)
                                 for i in range(0, len(grid), 500)])
        key = features.cache_key(encoder, splits[name].paths, "")[:20]
        rundir.write_atomically(folder / f"{name}-{key}.npy", lambda partial: np.save(partial, pooled))
        print(f"{name}: {pooled.shape} pooled features from {grids[0].name}")


def bleu_counts(references, candidates):
    """Per image: test length, the closest reference length, n-gram guesses and matches (n = 1..4),
    from ``pycocoevalcap``'s own counting (``bleu_scorer.BleuScorer``)."""
    from pycocoevalcap.bleu.bleu_scorer import BleuScorer

    scorer = BleuScorer(n=4)
    for refs, candidate in zip(references, candidates):
        scorer += (candidate if candidate.strip() else "<empty>", refs)
    lengths, guesses, matches = [], [], []
    for comps in scorer.ctest:
        lengths.append((comps["testlen"], scorer._single_reflen(comps["reflen"], "closest", comps["testlen"])))
        guesses.append(comps["guess"])
        matches.append(comps["correct"])
    return np.array(lengths, np.float64), np.array(guesses, np.float64), np.array(matches, np.float64)


def corpus_bleu4(lengths, guesses, matches):
    """BleuScorer.compute_score's corpus BLEU-4 from summed counts."""
    testlen, reflen = lengths.sum(axis=0)
    bleu = 1.0
    for k in range(4):
        bleu *= (matches[:, k].sum() + 1e-15) / (guesses[:, k].sum() + 1e-9)
    bleu = bleu ** 0.25
    ratio = (testlen + 1e-15) / (reflen + 1e-9)
    return bleu * math.exp(1 - 1 / ratio) if ratio < 1 else bleu


def per_image_scores(references, candidates):
    from pycocoevalcap.cider.cider import Cider

    gts = {i: refs for i, refs in enumerate(references)}
    res = {i: [c if c.strip() else "<empty>"] for i, c in enumerate(candidates)}
    cider, per_image = Cider().compute_score(gts, res)
    return bleu_counts(references, candidates), np.asarray(per_image, np.float64), float(cider)


def compare(attention_run, show_and_tell_run, resamples, seed=0):
    runs = {"attention": attention_run, "show-and-tell": show_and_tell_run}
    generated = {name: json.loads(rundir.RunDir(run).captions.read_text(encoding="utf-8")) for name, run in runs.items()}
    images = [row["image"] for row in generated["attention"]]
    if images != [row["image"] for row in generated["show-and-tell"]]:
        raise SystemExit("the two runs captioned different images")
    references = captions.reference_texts([row["references"] for row in generated["attention"]])
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(images), (resamples, len(images)))
    results = {}
    for decoding in ("greedy", "beam"):
        scores = {name: per_image_scores(references, [row[decoding] for row in rows]) for name, rows in generated.items()}
        row = {}
        for name, ((lengths, guesses, matches), cider_per_image, cider) in scores.items():
            row[name] = {"bleu4": corpus_bleu4(lengths, guesses, matches), "cider_d": cider}
        deltas = {"bleu4": [], "cider_d": []}
        for draw in draws:
            b = {name: corpus_bleu4(*(array[draw] for array in counts)) for name, (counts, _, _) in scores.items()}
            c = {name: per_image[draw].mean() for name, (_, per_image, _) in scores.items()}
            deltas["bleu4"].append(b["attention"] - b["show-and-tell"])
            deltas["cider_d"].append(c["attention"] - c["show-and-tell"])
        for metric, values in deltas.items():
            row[f"{metric}_difference"] = row["attention"][metric] - row["show-and-tell"][metric]
            row[f"{metric}_ci95"] = [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]
        results[decoding] = row
    return results


def val_scores(run, data_dir, beam_size):
    """Greedy and beam BLEU-4 / CIDEr-D of a run's final model (the one its ``metrics.json`` scored:
    phase 1's or phase 3's, on the same encoder) on the val split, decoded from the run's own val
    feature cache (the choice between the decoders is made on val, not test)."""
    import keras

    run = rundir.RunDir(run)
    best = Path(json.loads(run.metrics.read_text(encoding="utf-8"))["model"])
    model, vocabulary = cap.load_captioner(best)
    split = captions.load_caption_splits(data_dir)["val"]
    cached = list(run.features.glob("val-*.npy"))
    if len(cached) != 1 or run.best("phase2").is_file():
        raise SystemExit(f"{run.path}: val scores need a run without phase 2 and its one val cache")
    image_features = np.asarray(np.load(cached[0]), np.float32)
    decoder = StepDecoder(model)
    references = captions.reference_texts(split.captions)
    scores = {}
    for name, width in (("greedy", 1), ("beam", beam_size)):
        texts = [vocabulary.decode(ids) for ids in decoder.captions(image_features, width, vocabulary.max_length)]
        found = captions.caption_scores(references, texts, meteor=False)
        scores[name] = {"bleu4": found["bleu4"], "cider_d": found["cider_d"]}
    keras.backend.clear_session()
    return scores


def markdown(results, beam_size):
    lines = ["| decoding | metric | show-and-tell | attention | difference (95% paired bootstrap CI) |",
             "| --- | --- | --- | --- | --- |"]
    for decoding, row in results.items():
        label = "greedy" if decoding == "greedy" else f"beam {beam_size}"
        for metric, name in (("bleu4", "BLEU-4"), ("cider_d", "CIDEr-D")):
            low, high = row[f"{metric}_ci95"]
            lines.append(f"| {label} | {name} | {row['show-and-tell'][metric]:.3f} | {row['attention'][metric]:.3f} | "
                         f"{row[f'{metric}_difference']:+.3f} ({low:+.3f} to {high:+.3f}) |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True, type=Path)
    parser.add_argument("--attention-run", required=True, type=Path)
    parser.add_argument("--show-and-tell-run", required=True, type=Path)
    parser.add_argument("--weights", default="imagenet")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--fine-tune-epochs", type=int, default=0)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    options = parser.parse_args()
    if not rundir.RunDir(options.attention_run).captions.is_file():
        raise SystemExit(f"{options.attention_run} has no captions.json: train it to the end first.")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    timings = {}
    if not rundir.RunDir(options.show_and_tell_run).captions.is_file():
        train = ["train", "--data-dir", str(options.data_dir), "--output-dir", str(options.show_and_tell_run),
                 "--weights", options.weights, "--inject", "merge", "--epochs", str(options.epochs),
                 "--fine-tune-epochs", str(options.fine_tune_epochs)]
        args = cap.parse_args(train)
        seed_pooled_cache(options.attention_run, args)
        start = time.perf_counter()
        if cap.main(train) != 0:
            raise SystemExit("the show-and-tell run failed")
        timings["show_and_tell_train_seconds"] = round(time.perf_counter() - start, 1)
    results = compare(options.attention_run, options.show_and_tell_run, options.resamples)
    beam_size = json.loads(rundir.RunDir(options.attention_run).metrics.read_text())["beam_size"]
    table = markdown(results, beam_size)
    val = {name: val_scores(run, options.data_dir, beam_size)
           for name, run in (("show-and-tell", options.show_and_tell_run), ("attention", options.attention_run))}
    table += "\n\nval split (what chooses the default decoder):\n\n| decoder | greedy BLEU-4 | greedy CIDEr-D | " \
             f"beam {beam_size} BLEU-4 | beam {beam_size} CIDEr-D |\n| --- | --- | --- | --- | --- |\n" + "\n".join(
                 f"| {name} | {v['greedy']['bleu4']:.3f} | {v['greedy']['cider_d']:.3f} | {v['beam']['bleu4']:.3f} | "
                 f"{v['beam']['cider_d']:.3f} |" for name, v in val.items())
    results["val"] = val
    print(table)
    if options.json:
        options.json.write_text(json.dumps({"results": results, **timings}, indent=1) + "\n")
    if options.markdown:
        options.markdown.write_text(table + "\n")


if __name__ == "__main__":
    main()
