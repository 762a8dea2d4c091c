#!/usr/bin/env python
"""Time to the first training step of a phase on TensorFlow: the train step traced once
(``helpers.training.build_before_tracing``, what ``Trainer.fit`` does) against traced twice
(Keras's default without a distribution strategy: the optimizer's and the metrics' variables are
created inside the first trace, and ``tf.function`` then traces the step again).

Run by hand::

    python benchmarks/first_step.py [--image-size 299] [--rnn-units 2048] [--batch-size 2] [--repeats 2]

Phase 2 of the classifier at the seed's configuration (Xception trainable, two-layer LSTM, Adam,
accuracy and top-5 metrics; random weights), each variant in a fresh process, alternating,
``--repeats`` times: the seconds of ``model.fit`` over one step (tracing plus one step) and the
number of traces of the train step. Prints one table and the ratio of the medians.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(variant, image_size, rnn_units, batch_size):
    """One measurement in this process: ``{"seconds", "traces"}``."""
    sys.path.insert(0, str(ROOT))
    import keras
    import numpy as np

    import cnn_rnn_classifier as crc
    from helpers import training

    keras.utils.set_random_seed(0)
    model = crc.build_cnn_rnn_classifier(num_classes=100, image_size=image_size, rnn_timesteps=23,
                                         rnn_units=rnn_units, weights=None)
    crc.compile_classifier(model, crc.fine_tune_optimizer(1e-4))
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (batch_size, image_size, image_size, 3)).astype("float32")
    y = keras.utils.to_categorical(rng.integers(0, 100, batch_size), 100)
    traces = []
    real = keras.Model.train_step
    keras.Model.train_step = lambda self, *args: traces.append(1) or real(self, *args)
    start = time.perf_counter()
    if variant == "once":
        training.build_before_tracing(model, [(x, y)])
    model.fit(x, y, batch_size=batch_size, epochs=1, verbose=0)
    return {"seconds": time.perf_counter() - start, "traces": len(traces)}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        variant, image_size, rnn_units, batch_size = argv[1], *map(int, argv[2:5])
        print(json.dumps(child(variant, image_size, rnn_units, batch_size)))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image-size", type=int, default=299)
    parser.add_argument("--rnn-units", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    results = {"once": [], "twice": []}
    for _ in range(args.repeats):
        for variant in results:
            out = subprocess.run([sys.executable, __file__, "--child", variant, str(args.image_size),
                                  str(args.rnn_units), str(args.batch_size)], capture_output=True, text=True, check=True)
            results[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"classifier phase 2, {args.image_size} px, LSTM {args.rnn_units}, batch {args.batch_size}, TensorFlow")
    print("| train step | traces | seconds to the end of the first step (each run) | median |")
    print("| --- | --- | --- | --- |")
    medians = {}
    for variant, runs in results.items():
        medians[variant] = statistics.median(r["seconds"] for r in runs)
        seconds = ", ".join(f"{r['seconds']:.1f}" for r in runs)
        print(f"| traced {variant} | {runs[0]['traces']} | {seconds} | {medians[variant]:.1f} |")
    print(f"twice / once: {medians['twice'] / medians['once']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
