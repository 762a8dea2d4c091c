#!/usr/bin/env python
"""Two (or more) saved classifiers on the same labelled images: top-1 and top-5 of each, and each
model's difference from the first with its paired standard error.

Every model scores the same images (``--split``, default ``test``), read as ``evaluate`` reads them
(``cnn_rnn_classifier.evaluate_classifier``'s input path, no shuffling). For a model B against the first
model A, with per-image correctness ``a_i, b_i`` in {0, 1}, the difference is ``mean(b - a)`` and
its standard error ``std(b - a, ddof=1) / sqrt(n)`` (paired: both models saw the same images, so
the images' difficulty cancels out; the unpaired error is also printed).

    python benchmarks/compare_classifiers.py --data-dir DATA --models A.keras B.keras [--json FILE]

Used for the README's ``--cnn-only`` ablation. Measurements only, not a test.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def paired_difference(first, second):
    """``(mean(second - first), its standard error, the unpaired standard error)`` of two equal-length
    0/1 arrays."""
    import numpy as np

    first, second = np.asarray(first, float), np.asarray(second, float)
    difference = second - first
    n = len(difference)
    unpaired = np.sqrt(first.var(ddof=1) / n + second.var(ddof=1) / n)
    return float(difference.mean()), float(difference.std(ddof=1) / np.sqrt(n)), float(unpaired)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--models", type=Path, nargs="+", required=True, help="saved .keras classifiers")
    parser.add_argument("--split", default="test", help="the labelled split scored (default: test)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default: 64)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    import numpy as np

    import cnn_rnn_classifier as crc
    from helpers import data, training

    results, correct = [], []
    for path in args.models:
        model, classes = training.load_checkpoint(path, "classifier")
        split = data.list_split(args.data_dir / args.split, classes.get("class_names"), args.split)
        probabilities = model.predict(crc.flow_from_split(split, model.input_shape[1], args.batch_size,
                                                          shuffle=False, workers=2), verbose=0)
        labels = np.asarray(split.labels)
        ranked = np.argsort(-probabilities, axis=1)
        top1 = ranked[:, 0] == labels
        top5 = (ranked[:, :5] == labels[:, None]).any(axis=1)
        correct.append((top1, top5))
        results.append({"model": str(path), "images": len(labels), "top1": float(top1.mean()),
                        "top5": float(top5.mean())})
    for result, (top1, top5) in zip(results[1:], correct[1:]):
        for name, first, this in (("top1", correct[0][0], top1), ("top5", correct[0][1], top5)):
            mean, paired, unpaired = paired_difference(first, this)
            result[f"{name}_minus_first"] = mean
            result[f"{name}_minus_first_se"] = paired
            result[f"{name}_minus_first_unpaired_se"] = unpaired
    for result in results:
        print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
