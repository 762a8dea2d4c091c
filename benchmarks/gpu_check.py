#!/usr/bin/env python
"""The prepared GPU check: the three models' training speed on one GPU, and a short real run.

Run by hand on a GPU box with the JAX backend (or, with ``--smoke``, anywhere on tiny shapes)::

    python benchmarks/prepare_gpu_check.py --output .gpu_check     # here: wheels, weights, data (<= 64 MiB)
    KERAS_BACKEND=jax python benchmarks/gpu_check.py --carried .gpu_check [--json $OUT/gpu_check.json]
    KERAS_BACKEND=jax python benchmarks/gpu_check.py --smoke        # tiny shapes, on a CPU (a test runs it)

It prints one table. For each model at the seed's configuration (classifier 299 px, LSTM 2048,
phase 1 batch 32 with Xception frozen and phase 2 batch 16 with everything trained; LRCN 16
frames x 224 px, batch 4; captioner 299 px, batch 64, end to end) in float32 and in bfloat16
mixed precision (the backbone in bfloat16, as ``--mixed-precision bfloat16`` trains;
``--precision`` picks one): images (or clips) per second of ``train_on_batch`` (median of
``--steps`` steps after two warm-up steps, one with ``--smoke``; compilation excluded), the
peak device memory of that measurement
(each in a fresh process, so the peak is its own), the training FLOPs per step (XLA's cost
analysis of the forward and backward pass of the trainable weights) and the model FLOP
utilisation: achieved FLOP/s over the same device's bfloat16 matmul peak, measured first in the
same run. Phase 2 is also measured at a batch that fills the card (``--fill-batch``). Then a
short real run: ``cnn_rnn_classifier.py train`` with pretrained Xception (the carried float16
copy of the ImageNet weights, cast back to float32) on the carried tiny-imagenet-100 subset, with
its held-out accuracy and images/s.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (name, model, phase, batch, what one example is)
SEED = [("classifier phase 1", "classifier", 1, 32, "images"), ("classifier phase 2", "classifier", 2, 16, "images"),
        ("LRCN", "lrcn", 2, 4, "clips"), ("captioner", "captioner", 2, 64, "images")]
# --precision: the --mixed-precision values each choice measures
PRECISIONS = {"both": ("off", "bfloat16"), "float32": ("off",), "bfloat16": ("bfloat16",)}
SMOKE = {"classifier": dict(image_size=71, rnn_timesteps=71, rnn_units=8), "lrcn": dict(frames=2, image_size=32),
         "captioner": dict(image_size=71)}


def build(model, mixed_precision, smoke):
    """The model at the seed's configuration (or tiny with ``smoke``), random weights, compiled
    with its phase-2 optimizer. Returns ``(keras_model, make_batch)``."""
    import keras
    import numpy as np

    rng = np.random.default_rng(0)
    if model == "classifier":
        import cnn_rnn_classifier as crc

        config = SMOKE["classifier"] if smoke else dict(image_size=299, rnn_timesteps=23, rnn_units=2048)
        net = crc.build_cnn_rnn_classifier(num_classes=100, weights=None, mixed_precision=mixed_precision, **config)
        crc.compile_classifier(net, crc.fine_tune_optimizer(1e-4))
        size = config["image_size"]
        return net, lambda n: (rng.uniform(-1, 1, (n, size, size, 3)).astype("float32"),
                               keras.utils.to_categorical(rng.integers(0, 100, n), 100))
    if model == "lrcn":
        import lrcn

        config = dict(frames=2, image_size=32, dense_units=16, gru_units=8) if smoke else dict(frames=16, image_size=224)
        net = lrcn.build_lrcn(101, weights=None, mixed_precision=mixed_precision, **config)
        lrcn.compile_lrcn(net, lrcn.fine_tune_optimizer(1e-4))
        frames, size = config["frames"], config["image_size"]
        return net, lambda n: (rng.uniform(0, 255, (n, frames, size, size, 3)).astype("float32"),
                               keras.utils.to_categorical(rng.integers(0, 101, n), 101))
    import captioning

    size = SMOKE["captioner"]["image_size"] if smoke else 299
    net = captioning.build_captioner(vocabulary_size=3000, image_size=size, weights=None,
                                     mixed_precision=mixed_precision)
    captioning.compile_captioner(net, captioning.fine_tune_optimizer(1e-4))
    steps = 16  # a typical Flickr8k caption with <start>
    return net, lambda n: ((rng.uniform(0, 255, (n, size, size, 3)).astype("float32"),
                            rng.integers(4, 3000, (n, steps)).astype("int32")),
                           rng.integers(4, 3000, (n, steps)).astype("int32"))


def train_flops(net, x, y):
    """FLOPs of one training step's forward and backward pass over the trainable weights (XLA's
    cost analysis of the lowered JAX computation; the optimizer update is left out)."""
    import jax
    import keras
    from keras import ops

    loss_function = keras.losses.get(net.loss)
    trainable = [v.value for v in net.trainable_variables]
    frozen = [v.value for v in net.non_trainable_variables]

    def gradients(trainable, frozen, x, y):
        def loss(trainable):
            predicted, _ = net.stateless_call(trainable, frozen, x, training=True)
            return ops.mean(loss_function(y, predicted))

        return jax.grad(loss)(trainable)

    analysis = jax.jit(gradients).lower(trainable, frozen, x, y).cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    return float(analysis.get("flops", 0.0))


def measure(model, phase, batch, mixed_precision, steps, smoke):
    """One measurement (run in its own process): ``{"per_second", "peak_bytes", "flops_per_step"}``."""
    import jax
    import keras

    from helpers import training

    keras.utils.set_random_seed(0)
    net, make_batch = build(model, mixed_precision, smoke)
    if model == "classifier" and phase == 1:
        training.set_backbone_trainable(net, "xception", False)
        import cnn_rnn_classifier as crc

        crc.compile_classifier(net, keras.optimizers.RMSprop(1e-3))
    x, y = make_batch(batch)
    flops = train_flops(net, x, y) if keras.backend.backend() == "jax" else 0.0
    times, warm_up = [], 1 if smoke else 2  # smoke: the first step compiles; its timings mean nothing on a CPU
    for step in range(warm_up + steps):
        start = time.perf_counter()
        net.train_on_batch(x, y)  # returns host numbers: the step has finished
        if step >= warm_up:
            times.append(time.perf_counter() - start)
    device = jax.devices()[0]
    stats = device.memory_stats() or {} if hasattr(device, "memory_stats") else {}
    seconds = statistics.median(times)
    return {"per_second": batch / seconds, "step_seconds": seconds, "peak_bytes": stats.get("peak_bytes_in_use"),
            "flops_per_step": flops, "device": str(device)}


def matmul_peak(smoke):
    """bfloat16 and float32 matmul FLOP/s of this device (n x n x n, mean of 10 after 3 warm-ups)."""
    import jax
    import jax.numpy as jnp

    n = 256 if smoke else 8192
    peaks = {}
    for dtype in ("bfloat16", "float32"):
        a = jax.random.normal(jax.random.key(0), (n, n), dtype)
        b = jax.random.normal(jax.random.key(1), (n, n), dtype)
        product = jax.jit(jnp.matmul)
        for _ in range(3):
            product(a, b).block_until_ready()
        start = time.perf_counter()
        for _ in range(10):
            c = product(a, b)
        c.block_until_ready()
        peaks[dtype] = 2 * n**3 * 10 / (time.perf_counter() - start)
    return peaks


def child(argv):
    """``gpu_check.py --child MODEL PHASE BATCH PRECISION STEPS SMOKE``: one measurement, one JSON line."""
    sys.path.insert(0, str(ROOT))
    model, phase, batch, precision, steps, smoke = argv
    print(json.dumps(measure(model, int(phase), int(batch), precision, int(steps), smoke == "1")))


def run_child(model, phase, batch, precision, steps, smoke):
    result = subprocess.run([sys.executable, __file__, "--child", model, str(phase), str(batch), precision,
                             str(steps), "1" if smoke else "0"], capture_output=True, text=True, cwd=ROOT)
    if result.returncode:
        return {"error": (result.stderr.strip().splitlines() or ["?"])[-1][:200]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def full_weights(source, target):
    """Copies a ``.weights.h5`` file that ``prepare_gpu_check.half_weights`` stored in float16 back
    to float32, attributes included, so that Keras loads it."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from prepare_gpu_check import cast_weights

    cast_weights(source, target, "float16", "float32")


def real_run(carried, smoke, output):
    """``cnn_rnn_classifier.py train`` on the carried tiny-imagenet-100 subset with the carried
    pretrained Xception: held-out top-1/top-5, and training images per second over the whole
    run (both phases' epochs over its wall time, start-up and evaluation included)."""
    data = carried / "tiny-imagenet-subset"
    weights = output / "xception_notop.weights.h5"
    full_weights(carried / "xception_notop.float16.weights.h5", weights)
    size, epochs = ("71", "1") if smoke else ("299", "2")
    quick = ["--steps-per-epoch", "2", "--no-feature-cache"] if smoke else []
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "cnn_rnn_classifier.py", "train", "--data-dir", str(data), "--output-dir",
                             str(output / "run"), "--weights", str(weights), "--image-size", size, "--rnn-timesteps",
                             "71" if smoke else "23", "--rnn-units", "8" if smoke else "2048", "--epochs", epochs,
                             "--fine-tune-epochs", epochs, "--skip-image-check", *quick], capture_output=True, text=True,
                            cwd=ROOT)
    seconds = time.perf_counter() - start
    if result.returncode:
        return {"error": (result.stderr.strip().splitlines() or ["?"])[-1][:300]}
    metrics = json.loads((output / "run" / "metrics.json").read_text())
    log = (output / "run" / "phase2_log.csv").read_text().splitlines()
    train_images = sum(1 for _ in (data / "train").rglob("*.JPEG"))
    epochs = int(epochs)
    return {"top1": metrics["top1"], "top5": metrics["top5"], "test_images": metrics["num_images"],
            "train_images": train_images, "epochs": [epochs, len(log) - 1], "wall_seconds": seconds,
            "train_images_per_second": train_images * 2 * epochs / seconds}  # wall clock, start-up included


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        return child(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, runs on a CPU in about a minute")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per measurement (default: 10; smoke 2)")
    parser.add_argument("--fill-batch", type=int, default=64, help="phase 2's batch that fills the card (default: 64)")
    parser.add_argument("--carried", type=Path, default=None,
                        help="what prepare_gpu_check.py wrote: the real run runs when given (default: skip it)")
    parser.add_argument("--only", choices=("classifier", "lrcn", "captioner"), default=None,
                        help="measure this model only (default: all three)")
    parser.add_argument("--precision", choices=tuple(PRECISIONS), default="both",
                        help="measure in float32, in bfloat16 mixed precision, or both (default: both)")
    parser.add_argument("--json", default=None, help="also write the results here (a file name)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from helpers import rundir
    from helpers.errors import UsageError

    try:  # judged before minutes of measuring: a file can be created where --json goes
        if args.json is not None:
            if args.json.endswith(("/", os.sep)):
                raise UsageError(f"--json {args.json} names a folder; give a file name (e.g. {args.json}gpu_check.json)")
            args.json = Path(args.json)
            rundir.check_writable(args.json, "--json")
        if args.carried is not None and not (args.carried / "tiny-imagenet-subset").is_dir():
            raise UsageError(f"--carried {args.carried} holds no tiny-imagenet-subset/: run "
                             "benchmarks/prepare_gpu_check.py --output there first")
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    import keras

    steps = args.steps or (2 if args.smoke else 10)
    results = {"backend": keras.backend.backend(), "smoke": args.smoke, "matmul_peak": matmul_peak(args.smoke),
               "rows": []}
    peak = results["matmul_peak"]["bfloat16"]
    plan = [(name, model, phase, 2 if args.smoke else batch, what) for name, model, phase, batch, what in SEED]
    plan.insert(2, ("classifier phase 2, filling batch", "classifier", 2, 4 if args.smoke else args.fill_batch,
                    "images"))
    for name, model, phase, batch, what in plan:
        if args.only and model != args.only:
            continue
        for precision in PRECISIONS[args.precision]:
            row = {"name": name, "batch": batch, "precision": "float32" if precision == "off" else "bfloat16 mixed",
                   "unit": what, **run_child(model, phase, batch, precision, steps, args.smoke)}
            if "per_second" in row:
                row["mfu"] = row["flops_per_step"] / row["step_seconds"] / peak
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
    if args.carried:
        with tempfile.TemporaryDirectory() as folder:
            results["real_run"] = real_run(args.carried, args.smoke, Path(folder))
    print(table(results))
    if args.json:
        rundir.write_text(args.json, json.dumps(results, indent=1))
    return 0


def table(results):
    peaks = results["matmul_peak"]
    lines = [f"backend {results['backend']}; matmul peak bf16 {peaks['bfloat16'] / 1e12:.1f} TFLOP/s, "
             f"fp32 {peaks['float32'] / 1e12:.1f} TFLOP/s",
             "| model | batch | precision | per second | peak memory GiB | GFLOP per step | MFU (bf16 peak) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in results["rows"]:
        if "error" in row:
            lines.append(f"| {row['name']} | {row['batch']} | {row['precision']} | error: {row['error']} | | | |")
            continue
        memory = f"{row['peak_bytes'] / 2**30:.1f}" if row.get("peak_bytes") else "n/a"
        lines.append(f"| {row['name']} | {row['batch']} | {row['precision']} | {row['per_second']:.1f} {row['unit']} | "
                     f"{memory} | {row['flops_per_step'] / 1e9:.1f} | {100 * row['mfu']:.1f}% |")
    if "real_run" in results:
        lines.append(f"real run: {json.dumps(results['real_run'])}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
