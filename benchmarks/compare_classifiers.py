#!/usr/bin/env python
"""Two (or more) saved classifiers or LRCNs on the same labelled samples: top-1 and top-5 of each, and
each model's difference from the first, paired, with its standard error and a bootstrap 95% interval.

Every model scores the same samples (``--split``, default ``test``), read as ``evaluate`` reads them
(no shuffling): images for ``cnn_rnn_classifier`` models (``evaluate_classifier``'s input path), clips
for LRCNs (``lrcn.lrcn_probabilities``: frame folders or ``.npy`` feature clips). For a model B against
the first model A, with per-sample correctness ``a_i, b_i`` in {0, 1}, the difference is
``mean(b - a)``, its standard error ``std(b - a, ddof=1) / sqrt(n)`` (paired: both models saw the
same samples, so their difficulty cancels out; the unpaired error is also printed), and its 95%
interval the 2.5th and 97.5th percentiles of the mean of ``b - a`` over ``--resamples`` bootstrap
resamples of the samples (seeded: the same figures every run). ``--shuffled-frames`` adds, after
each LRCN, the same LRCN on the same clips with each clip's frames in a random order;
``--test-time-flips`` adds, after each image classifier, the same classifier with ``--tta flip``.

    python benchmarks/compare_classifiers.py --data-dir DATA --models A.keras B.keras [--shuffled-frames]
        [--test-time-flips] [--json FILE]

Used for the README's ``--cnn-only`` ablation and the LRCN's baselines on UCF101. Measurements
only, not a test.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESAMPLES = 10_000


def paired_difference(first, second, resamples=RESAMPLES, seed=0):
    """``(mean(second - first), its standard error, the unpaired standard error, (low, high))`` of two
    equal-length 0/1 arrays; ``(low, high)`` is the bootstrap 95% interval of the mean difference
    (percentiles over ``resamples`` resamples of the pairs)."""
    import numpy as np

    first, second = np.asarray(first, float), np.asarray(second, float)
    difference = second - first
    n = len(difference)
    unpaired = np.sqrt(first.var(ddof=1) / n + second.var(ddof=1) / n)
    rng = np.random.default_rng(seed)
    means = np.array([difference[rng.integers(0, n, n)].mean() for _ in range(resamples)])
    interval = (float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5)))
    return float(difference.mean()), float(difference.std(ddof=1) / np.sqrt(n)), float(unpaired), interval


def scores(path, data_dir, split_name, batch_size, shuffled_frames, test_time_flips=False):
    """``[(name, probabilities, labels), ...]`` of one saved model (and its shuffled-frames or
    test-time-flips twin)."""
    import cnn_rnn_classifier as crc  # importing the scripts registers their layers: models load in safe mode
    import lrcn
    from helpers import training

    kind = "lrcn" if training.saved_model_name(path) == "lrcn" else "classifier"
    model, classes = training.load_checkpoint(path, kind)
    names = classes.get("class_names")
    if kind == "lrcn":
        from helpers import sequences

        split = sequences.list_sequences(data_dir / split_name, names)
        result = [(str(path), *lrcn.lrcn_probabilities(model, split, batch_size))]
        if shuffled_frames:
            result.append((f"{path} (frames shuffled)",
                           *lrcn.lrcn_probabilities(model, split, batch_size, shuffle_frames=True)))
        return result
    from helpers import data

    from helpers.layers import flip_averaged

    split = data.list_split(data_dir / split_name, names, split_name)
    result = []
    for tta in ("none", "flip") if test_time_flips else ("none",):
        probabilities = flip_averaged(model, tta).predict(crc.flow_from_split(
            split, model.input_shape[1], batch_size, shuffle=False, workers=2), verbose=0)
        result.append((str(path) + (" (test-time flips)" if tta == "flip" else ""), probabilities, split.labels))
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--models", type=Path, nargs="+", required=True, help="saved .keras classifiers or LRCNs")
    parser.add_argument("--split", default="test", help="the labelled split scored (default: test)")
    parser.add_argument("--batch-size", type=int, default=64, help="samples per forward pass (default: 64)")
    parser.add_argument("--shuffled-frames", action="store_true",
                        help="after each LRCN, the same LRCN with each clip's frames shuffled (default: off)")
    parser.add_argument("--test-time-flips", action="store_true",
                        help="after each image classifier, the same classifier with --tta flip (default: off)")
    parser.add_argument("--resamples", type=int, default=RESAMPLES,
                        help=f"bootstrap resamples of the 95%% intervals (default: {RESAMPLES})")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    from helpers import rundir
    from helpers.errors import UsageError

    try:  # before minutes of scoring
        if args.json:
            rundir.check_writable(args.json, "--json")
    except UsageError as error:
        parser.error(str(error))

    import numpy as np

    results, correct = [], []
    for path in args.models:
        for name, probabilities, labels in scores(path, args.data_dir, args.split, args.batch_size,
                                                  args.shuffled_frames, args.test_time_flips):
            labels = np.asarray(labels)
            ranked = np.argsort(-probabilities, axis=1)
            top1 = ranked[:, 0] == labels
            top5 = (ranked[:, :5] == labels[:, None]).any(axis=1)
            correct.append((top1, top5))
            results.append({"model": name, "samples": len(labels), "top1": float(top1.mean()),
                            "top5": float(top5.mean())})
    for result, (top1, top5) in zip(results[1:], correct[1:]):
        for name, first, this in (("top1", correct[0][0], top1), ("top5", correct[0][1], top5)):
            mean, paired, unpaired, (low, high) = paired_difference(first, this, args.resamples)
            result[f"{name}_minus_first"] = mean
            result[f"{name}_minus_first_se"] = paired
            result[f"{name}_minus_first_unpaired_se"] = unpaired
            result[f"{name}_minus_first_95"] = [low, high]
    for result in results:
        print(json.dumps(result))
    if args.json:
        rundir.write_text(args.json, json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
