#!/usr/bin/env python
"""The clip-level linear probe that LRCN must beat on real footage.

A logistic regression (a softmax ``Dense`` with L2, full batch, Adam) on the mean over a
clip's frames of the same frozen VGG16 features LRCN reads (``frame_backbone`` of a model
built with the same ``--image-size``/``--weights``: VGG16 preprocessing, VGG16, Flatten),
standardised with the training clips' statistics, for the same evenly spread ``--frames``
frames of each clip. The L2 strength is chosen on val; test is reported (with ``--json``,
also the predicted class of every test clip, ``test_predictions``).

    python benchmarks/lrcn_probe.py --data-dir DATA --frames 8 --image-size 96 --weights PATH

Measurements only: nothing here is part of the tests.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--weights", default="imagenet")
    parser.add_argument("--epochs", type=int, default=300, help="full-batch Adam steps (default: 300)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    import keras
    import numpy as np

    import lrcn
    from helpers import features, sequences, training

    train = sequences.list_sequences(args.data_dir / "train")
    splits = {"train": train, **{name: sequences.list_sequences(args.data_dir / name, train.class_names)
                                 for name in ("val", "test")}}
    model = lrcn.build_lrcn(len(train.class_names), frames=args.frames, image_size=args.image_size,
                            weights=args.weights, mixed_precision="off")
    backbone = training.find_layer(model, "frame_backbone")
    means, labels = {}, {}
    with tempfile.TemporaryDirectory() as folder:
        for name, split in splits.items():
            paths = [p for sample in split.samples for p in sequences.sampled_paths(sample, args.frames)]
            values = features.cached_features(backbone, paths, folder, name,
                                              loader=lambda chunk: sequences.load_frames(chunk, args.image_size))
            means[name] = values.reshape(len(split), args.frames, -1)
            labels[name] = np.asarray(split.labels)
    mean, std = means["train"].mean(axis=(0, 1)), means["train"].std(axis=(0, 1)) + 1e-6
    inputs = {name: ((value - mean) / std).mean(axis=1) for name, value in means.items()}
    classes = len(train.class_names)
    results = {"clips": {name: len(split) for name, split in splits.items()}, "by_l2": {}}
    predictions = {}
    for l2 in (1e-4, 1e-3, 1e-2, 1e-1):
        keras.utils.set_random_seed(0)
        probe = keras.Sequential([keras.Input(inputs["train"].shape[1:]), keras.layers.Dense(
            classes, activation="softmax", kernel_regularizer=keras.regularizers.l2(l2))])
        probe.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
        probe.fit(inputs["train"], labels["train"], batch_size=len(labels["train"]), epochs=args.epochs, verbose=0)
        results["by_l2"][l2] = {name: float(probe.evaluate(inputs[name], labels[name], verbose=0)[1])
                                for name in ("train", "val", "test")}
        predictions[l2] = probe.predict(inputs["test"], verbose=0).argmax(axis=-1).tolist()
    best = max(results["by_l2"], key=lambda l2: results["by_l2"][l2]["val"])  # the first of ties
    results.update(l2=best, **{f"{name}_top1": results["by_l2"][best][name] for name in ("val", "test")})
    results["test_predictions"] = predictions[best]  # class index per test clip, in list_sequences order
    print(json.dumps(results, indent=1))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
