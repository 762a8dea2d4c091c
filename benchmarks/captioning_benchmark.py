#!/usr/bin/env python
"""Captioning speed, side by side in one run: phase 1 on cached features against recomputing
Xception every epoch, and decoding throughput, greedy against beam search.

Run by hand, never part of pass/fail::

    python benchmarks/captioning_benchmark.py --data-dir FLICKR8K [--images 200] [--epochs 3]
        [--weights PATH] [--model runs/captioning/phase2_best.keras] [--markdown FILE]

1. Phase 1 (Xception frozen) over ``--epochs`` epochs of every caption of ``--images`` Flickr8k
   training images (5 captions each), batch 64, the default model (224 px here, embedding 256,
   LSTM 512, ``--mixed-precision auto``): (a) what ``captioning.py`` does, the decoder fitted on
   features computed once (the extraction pass counted in the first epoch), and (b) the full
   captioner fitted on the images, Xception running on every caption of every epoch. Seconds per
   epoch, the total and the ratio.
2. Decoding ``--decode-images`` test images' features (from ``--model``, a trained captioner, so
   the captions have their real lengths; without it an untrained one): captions/s greedy and
   beam 3, after a warm-up batch, encoder time excluded.
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import captioning as cap  # noqa: E402
from helpers import caption_batches, caption_evaluation, captions, features, training  # noqa: E402
from helpers.decoding import StepDecoder  # noqa: E402


class EpochTimes(keras.callbacks.Callback):
    """Keeps each epoch's wall time in seconds."""

    def __init__(self):
        super().__init__()
        self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)


def phase1_comparison(args, split, vocabulary):
    table = caption_batches.CaptionTable(split, vocabulary)
    results = {}
    for way in ("cached", "recomputed"):
        keras.utils.set_random_seed(0)
        model = cap.build_captioner(vocabulary_size=len(vocabulary), image_size=args.image_size, weights=args.weights,
                                    mixed_precision="auto")
        training.set_backbone_trainable(model, cap.BACKBONE, False)
        times = EpochTimes()
        start = time.perf_counter()
        if way == "cached":
            decoder = model.get_layer("decoder")
            cap.compile_captioner(decoder, cap.phase1_optimizer(1e-3))
            with tempfile.TemporaryDirectory() as folder:
                cached = features.cached_features(model.get_layer("encoder"), split.paths, folder, "train")
            extraction = time.perf_counter() - start
            data = caption_batches.feature_caption_batches(cached, table, 64, shuffle=True)
            decoder.fit(data, epochs=args.epochs, callbacks=[times], verbose=0)
            times.seconds[0] += extraction
        else:
            cap.compile_captioner(model, cap.phase1_optimizer(1e-3))
            paths = tf.constant([str(p) for p in split.paths])
            pairs = tf.data.Dataset.from_tensor_slices((table.image, table.ids, table.lengths)).shuffle(
                len(table.image), seed=0)

            def pair(image, ids, length):
                tokens, targets = cap._teacher_forcing(ids, length)
                return (features.tf_read_rgb(paths[image], args.image_size), tokens), targets

            data = cap._batched(pairs.map(pair, num_parallel_calls=tf.data.AUTOTUNE), 64, table.lengths - 1)
            model.fit(data, epochs=args.epochs, callbacks=[times], verbose=0)
        results[way] = {"epoch_seconds": [round(s, 2) for s in times.seconds], "total_seconds": round(sum(times.seconds), 2)}
        print(json.dumps({"phase1": way, **results[way]}), flush=True)
    results["ratio"] = round(results["recomputed"]["total_seconds"] / results["cached"]["total_seconds"], 2)
    results["ratio_after_first_epoch"] = round(
        sum(results["recomputed"]["epoch_seconds"][1:]) / max(sum(results["cached"]["epoch_seconds"][1:]), 1e-9), 2)
    return results


def decoding_throughput(args, split, vocabulary):
    if args.model:
        model, vocabulary = cap.load_captioner(args.model)
    else:
        keras.utils.set_random_seed(0)
        model = cap.build_captioner(vocabulary_size=len(vocabulary), image_size=args.image_size, weights=args.weights,
                                    mixed_precision="auto")
    image_features = caption_evaluation.encode_images(model, split.paths[: args.decode_images], verbose=0)
    decoder = StepDecoder(model)
    results = {}
    for name, width in (("greedy", 1), ("beam3", 3)):
        decoder.captions(image_features[:64], width, vocabulary.max_length)  # warm-up: tracing
        start = time.perf_counter()
        found = decoder.captions(image_features, width, vocabulary.max_length)
        seconds = time.perf_counter() - start
        results[name] = {"captions_per_second": round(len(found) / seconds, 1), "seconds": round(seconds, 2),
                         "mean_words": round(sum(len(f) for f in found) / len(found), 2)}
        print(json.dumps({"decoding": name, **results[name]}), flush=True)
    results["greedy_over_beam3"] = round(results["greedy"]["captions_per_second"]
                                         / results["beam3"]["captions_per_second"], 2)
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, type=Path, help="Flickr8k folder (see captioning.py)")
    parser.add_argument("--images", type=int, default=200, help="training images for phase 1 (default: 200)")
    parser.add_argument("--epochs", type=int, default=3, help="phase 1 epochs (default: 3)")
    parser.add_argument("--image-size", type=int, default=224, help="pixels (default: 224)")
    parser.add_argument("--weights", default=str(ROOT.parent / "shared/weights/xception_imagenet_notop.weights.h5"),
                        help="Xception weights (default: ../shared/weights' file)")
    parser.add_argument("--model", type=Path, help="a trained captioner for the decoding measurement (default: untrained)")
    parser.add_argument("--decode-images", type=int, default=500, help="test images decoded (default: 500)")
    parser.add_argument("--markdown", type=Path, help="also write the results here")
    args = parser.parse_args()

    splits = captions.load_caption_splits(args.data_dir)
    train = splits["train"]
    train = captions.CaptionSplit("train", train.paths[: args.images], train.captions[: args.images], train.source)
    vocabulary = captions.Vocabulary.from_captions([t for refs in splits["train"].captions for t in refs])
    machine = {"python": platform.python_version(), "tensorflow": tf.__version__, "cpus": os.cpu_count(),
               "gpus": len(tf.config.list_physical_devices("GPU"))}
    results = {"machine": machine, "phase1": phase1_comparison(args, train, vocabulary),
               "decoding": decoding_throughput(args, splits["test"], vocabulary)}
    print(json.dumps(results, indent=1))
    if args.markdown:
        p, d = results["phase1"], results["decoding"]
        args.markdown.write_text(
            f"machine: {machine}\n\n| phase 1, {args.images} images x 5 captions, {args.epochs} epochs | s per epoch | total s |\n"
            f"|---|---|---|\n| cached features | {p['cached']['epoch_seconds']} | {p['cached']['total_seconds']} |\n"
            f"| Xception every epoch | {p['recomputed']['epoch_seconds']} | {p['recomputed']['total_seconds']} |\n"
            f"| ratio | | {p['ratio']}x (after the first epoch {p['ratio_after_first_epoch']}x) |\n\n"
            f"| decoding, {args.decode_images} images | captions/s | mean words |\n|---|---|---|\n"
            f"| greedy | {d['greedy']['captions_per_second']} | {d['greedy']['mean_words']} |\n"
            f"| beam 3 | {d['beam3']['captions_per_second']} | {d['beam3']['mean_words']} |\n")


if __name__ == "__main__":
    main()
