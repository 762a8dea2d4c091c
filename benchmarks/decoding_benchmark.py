#!/usr/bin/env python
"""Decoding speed of a captioner: captions/s, greedy and beam 3, for show-and-tell and attention.

Run by hand, never part of pass/fail::

    python benchmarks/decoding_benchmark.py [--images 256] [--max-length 20] [--vocabulary 2541]
        [--model runs/captioning/phase3_best.keras]
    KERAS_BACKEND=jax python benchmarks/decoding_benchmark.py

``helpers.decoding.StepDecoder.captions`` (the one beam search, compiled: a ``tf.function`` on
TensorFlow, ``jax.jit`` on JAX) over ``--images`` random image features in batches of 64, after
a warm-up batch (tracing and compilation not counted), the encoder not run. Without ``--model``
the captioners are untrained (Flickr8k's vocabulary size, the default sizes): their captions run
to ``--max-length`` words, every step of every hypothesis taken, the search's worst case. With a
trained ``--model`` the captions have their real lengths. Prints one JSON line.
"""

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256, help="images captioned per measurement (default: 256)")
    parser.add_argument("--max-length", type=int, default=20, help="words at most per caption (default: 20)")
    parser.add_argument("--vocabulary", type=int, default=2541,
                        help="vocabulary size of the untrained captioners (default: 2541, Flickr8k's)")
    parser.add_argument("--model", type=Path, help="a trained captioner .keras instead (default: untrained ones)")
    args = parser.parse_args(argv)

    import keras
    import numpy as np

    import captioning as cap
    from helpers.decoding import StepDecoder

    results = {"backend": keras.backend.backend(), "python": platform.python_version(), "cpus": os.cpu_count()}
    if args.model:
        model, vocabulary = cap.load_captioner(args.model)
        models, max_length = {"model": model}, vocabulary.max_length
    else:
        models, max_length = {}, args.max_length
        for decoder, inject in (("show-and-tell", "merge"), ("attention", "pre")):
            keras.utils.set_random_seed(0)
            models[decoder] = cap.build_captioner(vocabulary_size=args.vocabulary, image_size=71, weights=None,
                                                  decoder=decoder, inject=inject)
    for name, model in models.items():
        shape = model.get_layer("encoder").output_shape[1:]
        if len(shape) == 2:  # an attention grid: the 10 x 10 of a 299-pixel image
            shape = (100, shape[-1])
        image_features = np.random.default_rng(0).normal(0, 1, (args.images, *shape)).astype(np.float32)
        decoder = StepDecoder(model)
        for search, width in (("greedy", 1), ("beam3", 3)):
            decoder.captions(image_features[:64], width, max_length)  # warm-up: tracing, compilation
            start = time.perf_counter()
            found = decoder.captions(image_features, width, max_length)
            seconds = time.perf_counter() - start
            results[f"{name} {search}"] = {"captions_per_second": round(len(found) / seconds, 1),
                                           "mean_words": round(float(np.mean([len(f) for f in found])), 1)}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
