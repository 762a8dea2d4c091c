#!/usr/bin/env python
"""Why the seed's LRCN cannot fit a few dozen real clips: one change at a time.

Phase 1 only (VGG16 frozen), the head trained on the cached frame features of the training
clips, as ``lrcn.py`` trains it, for each variant of the seed's recipe: its SGD, its three
dropouts of 0.5, its linear ``Dense`` on unnormalised flattened features, its GRU bias of
ones, its number of steps. Reports the training accuracy and loss of the last epoch (can
it fit?) and the val accuracy (never test), averaged over ``--seeds`` seeds.

    python benchmarks/lrcn_diagnosis.py --data-dir DATA --frames 8 --image-size 96 --weights PATH

Measurements only: nothing here is part of the tests.
"""

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SEED = "seed"
# name: (changes to the seed recipe, epochs)
VARIANTS = {
    "seed recipe (SGD 0.01, dropouts 0.5, linear Dense, bias ones), 6 epochs": ({}, 6),
    "seed recipe, 60 epochs (10x the steps)": ({}, 60),
    "seed recipe, dropouts 0": ({"dropout": 0.0, "recurrent_dropout": 0.0}, 6),
    "seed recipe, GRU bias zeros": ({"gru_bias": "zeros"}, 6),
    "seed recipe, features layer-normalised": ({"feature_norm": True}, 6),
    "seed recipe, Adam 1e-3": ({"optimizer": "adam", "learning_rate": 1e-3}, 6),
    "small-data recipe (all of the above but the steps), 6 epochs": ("small-data", 6),
    "small-data recipe, 40 epochs": ("small-data", 40),
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--dense-units", type=int, default=256)
    parser.add_argument("--gru-units", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--weights", default="imagenet")
    args = parser.parse_args(argv)

    import keras
    import numpy as np

    import lrcn
    from helpers import features, sequences, training

    train = sequences.list_sequences(args.data_dir / "train")
    splits = {"train": train, "val": sequences.list_sequences(args.data_dir / "val", train.class_names)}
    classes = len(train.class_names)
    data = {}
    with tempfile.TemporaryDirectory() as folder:
        backbone = training.find_layer(lrcn.build_lrcn(classes, frames=args.frames, image_size=args.image_size,
                                                       weights=args.weights), "frame_backbone")
        for name, split in splits.items():
            paths = [p for sample in split.samples for p in sequences.sampled_paths(sample, args.frames)]
            values = features.cached_features(backbone, paths, folder, name,
                                              loader=lambda chunk: sequences.load_frames(chunk, args.image_size))
            data[name] = ([values.reshape(len(split), args.frames, -1), np.ones((len(split), args.frames), bool)],
                          np.eye(classes, dtype="float32")[split.labels])
    print(f"{len(train)} training clips, {len(splits['val'])} val clips, {classes} classes, "
          f"{data['train'][0][0].shape[-1]} features per frame\n")
    print("| variant | train accuracy | train loss | val accuracy |\n| --- | --- | --- | --- |")
    for label, (changes, epochs) in VARIANTS.items():
        recipe = changes if isinstance(changes, str) else "diagnosis"
        if recipe == "diagnosis":
            lrcn.RECIPES["diagnosis"] = {**lrcn.RECIPES[SEED], **changes}
        results = []
        for seed in range(args.seeds):
            keras.utils.set_random_seed(seed)
            model = lrcn.build_lrcn(classes, frames=args.frames, image_size=args.image_size, weights=None,
                                    dense_units=args.dense_units, gru_units=args.gru_units, recipe=recipe)
            head = model.get_layer("lrcn_head")
            lrcn.compile_lrcn(head, lrcn.phase1_optimizer(lrcn.RECIPES[recipe]["learning_rate"], recipe))
            history = head.fit(*data["train"], batch_size=args.batch_size, epochs=epochs,
                               validation_data=tuple(data["val"]), verbose=0).history
            results.append((history["accuracy"][-1], history["loss"][-1], history["val_accuracy"][-1]))
        mean = np.mean(results, axis=0)
        print(f"| {label} | {mean[0]:.2f} | {mean[1]:.2f} | {mean[2]:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
