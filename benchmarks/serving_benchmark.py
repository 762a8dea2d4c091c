#!/usr/bin/env python
"""Serving speed of the classifier's exports, side by side in one run: the TensorFlow SavedModel
(``serve``) against ONNX Runtime (``model.onnx``), images/s at batch 1 and batch 32.

Run by hand, never part of pass/fail (needs requirements-onnx.txt)::

    python benchmarks/serving_benchmark.py [--image-size 299] [--rnn-timesteps 23] [--rnn-units 2048]
        [--model runs/x/phase2_best.keras] [--seconds 20]

Without ``--model`` the seed's classifier (299 px, two LSTM(2048), random weights: the speed is
the same) is built and saved; both exports are written by ``export_model`` (what ``export
--format saved_model`` and ``--format onnx`` write) into a temporary folder and served in this
process, each with its runtime's default threads, on the same random RGB 0..255 pixels (float32):
a warm-up call, then calls for ``--seconds`` each (at least 3); the probabilities of the two are
compared too. Prints one JSON line.
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


def images_per_second(serve, pixels, seconds):
    serve(pixels)  # warm-up: tracing, allocation
    calls, start = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - start < seconds:
        serve(pixels)
        calls += 1
    return round(calls * len(pixels) / (time.perf_counter() - start), 2)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=299, help="input size in pixels (default: 299)")
    parser.add_argument("--rnn-timesteps", type=int, default=23, help="the RNN branch's timesteps (default: 23)")
    parser.add_argument("--rnn-units", type=int, default=2048, help="units of both LSTMs (default: 2048)")
    parser.add_argument("--model", type=Path, help="a trained classifier .keras instead (default: the seed's, built)")
    parser.add_argument("--seconds", type=float, default=20.0, help="timed seconds per measurement (default: 20)")
    args = parser.parse_args(argv)

    import keras
    import numpy as np
    import onnxruntime
    import tensorflow as tf

    import cnn_rnn_classifier as crc
    from helpers import export, training
    from helpers.layers import XceptionPreprocess

    if args.model:
        model, _ = training.load_checkpoint(args.model, "classifier")
    else:
        keras.utils.set_random_seed(0)
        model = crc.build_cnn_rnn_classifier(num_classes=100, image_size=args.image_size,
                                             rnn_timesteps=args.rnn_timesteps, rnn_units=args.rnn_units,
                                             weights=None, mixed_precision="off")
    size = model.input_shape[1]
    results = {"python": platform.python_version(), "tensorflow": tf.__version__,
               "onnxruntime": onnxruntime.__version__, "cpus": os.cpu_count(), "image_size": size}
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        export.export_model(model, Path(folder) / "saved_model", "saved_model", preprocess=XceptionPreprocess())
        results["saved_model_export_seconds"] = round(time.perf_counter() - start, 1)
        start = time.perf_counter()
        onnx_file = export.export_model(model, Path(folder) / "onnx", "onnx", preprocess=XceptionPreprocess())
        results["onnx_export_seconds"] = round(time.perf_counter() - start, 1)
        served = tf.saved_model.load(str(Path(folder) / "saved_model"))
        session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        for batch in (1, 32):
            pixels = np.random.default_rng(batch).uniform(0, 255, (batch, size, size, 3)).astype(np.float32)
            saved = served.serve(tf.constant(pixels)).numpy()
            onnx = session.run(None, {name: pixels})[0]
            results[f"batch {batch}"] = {
                "saved_model_images_per_second": images_per_second(lambda x: served.serve(tf.constant(x)).numpy(),
                                                                   pixels, args.seconds),
                "onnx_runtime_images_per_second": images_per_second(lambda x: session.run(None, {name: x})[0],
                                                                    pixels, args.seconds),
                "max_probability_difference": float(np.abs(saved - onnx).max())}
            print(json.dumps({f"batch {batch}": results[f"batch {batch}"]}), flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
