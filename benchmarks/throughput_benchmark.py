#!/usr/bin/env python
"""Training throughput, input-path speed, FLOPs and memory, measured side by side in one run.

Run by hand, never part of pass/fail::

    python benchmarks/throughput_benchmark.py [--steps 4] [--quick] [--only lrcn] [--markdown benchmarks/results.md]

Every training measurement runs in a fresh subprocess (so its peak resident memory is
its own), on real JPEG files written to a temporary folder; throughput comes from the
median of ``--steps`` step times of ``model.fit`` after two warm-up steps (tracing
excluded, robust to the odd slow step). It prints one JSON object
per measurement and writes a markdown table with the machine it ran on.

Measured:

1. The classifier at the seed configuration (299 px, 23 x 3887, LSTM 2048, batch 16),
   phase 1 (Xception frozen) and phase 2 (all trainable), images/s: our default path
   (what ``cnn_rnn_classifier.py`` does with default flags: ``CustomImageDataGenerator``
   with 2 workers, ``FusedLSTM``, ``--mixed-precision auto``) and the seed-faithful
   baseline (a plain ``ImageDataGenerator`` subclass whose ``standardize()`` applies
   Xception preprocessing, ``keras.layers.LSTM``, ``fit`` with Keras defaults, float32).
2. The same at the demo's configuration (71 px, 71 x 71, LSTM 256, batch 32 / 16).
3. LRCN at 16 frames of 224 px, batch 4, clips/s (baseline: float32; default: ``--mixed-precision auto``).
4. The input path alone (decode, resize, preprocess), images/s: the generator against
   the tf.data path (``--input tf.data``), with 1 and 2 workers.
5. FLOPs per image (Xception from TensorFlow's profiler; the LSTMs and Dense layers
   counted analytically, since the profiler counts a loop body once) and the achieved
   FLOP/s as a fraction of this machine's float32 and bfloat16 matmul peak, measured here.
6. Peak resident memory of each training measurement.
7. Where a seed-configuration step's time goes, per component (``child_components``);
   ``benchmarks/profile_step.py`` gives the op-level view from TensorFlow's profiler.

``--quick`` skips the seed configuration and LRCN (minutes instead of a quarter hour).
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_images(folder, classes=4, per_class=40, size=64):
    """Real JPEG files (smooth gradients plus noise), ``folder/<class>/<i>.JPEG``."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, size)
    for c in range(classes):
        (folder / f"c{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = np.stack([np.add.outer(ramp, ramp) / 2, np.outer(ramp, ramp[::-1]) / 255, np.tile(ramp, (size, 1))], -1)
            pixels = np.clip(base * rng.uniform(0.3, 1, 3) + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"c{c}" / f"{i}.JPEG", quality=90)


def write_clips(folder, classes=2, per_class=6, frames=16, size=64):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(1)
    for c in range(classes):
        for s in range(per_class):
            clip = folder / f"c{c}" / f"s{s}"
            clip.mkdir(parents=True, exist_ok=True)
            for t in range(frames):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(clip / f"frame_{t}.jpg")


# ---------------------------------------------------------------- child measurements

def _fit_throughput(model, data, steps, batch):
    """Samples/s from the median step time of one ``fit`` after two warm-up steps (tracing excluded)."""
    import keras
    import numpy as np

    ends = []

    class StepTimes(keras.callbacks.Callback):
        def on_train_batch_end(self, step, logs=None):
            ends.append(time.perf_counter())

    model.fit(data, epochs=1, steps_per_epoch=steps + 2, verbose=0, callbacks=[StepTimes()])
    return batch / float(np.median(np.diff(ends[1:])))


def child_classifier(config):
    import keras
    import tensorflow as tf

    import cnn_rnn_classifier as crc
    from helpers import data, training

    size, batch = config["image_size"], config["batch"]
    if config["phase"] == 1:
        optimizer = keras.optimizers.RMSprop()
    else:  # the default path: what cnn_rnn_classifier.py uses
        optimizer = keras.optimizers.Adam(1e-4) if config["path"] == "baseline" else crc.fine_tune_optimizer(1e-4)
    if config["path"] == "baseline":
        class SeedGenerator(tf.keras.preprocessing.image.ImageDataGenerator):
            def standardize(self, x):
                return keras.applications.xception.preprocess_input(super().standardize(x))

        flow = SeedGenerator().flow_from_directory(config["data"], target_size=(size, size), batch_size=batch, seed=0)
        model = crc.build_cnn_rnn_classifier(flow.num_classes, size, config["timesteps"], config["units"],
                                             weights=None, fused_lstm=False)
        training.set_backbone_trainable(model, "xception", config["phase"] == 2)
        model.compile(optimizer=optimizer, loss="categorical_crossentropy", metrics=["accuracy"])
    else:  # what `python cnn_rnn_classifier.py` does with its default flags
        split = data.list_split(Path(config["data"]), None, "train")
        flow = crc.flow_from_split(split, size, batch, shuffle=True, seed=0, workers=2)
        model = crc.build_cnn_rnn_classifier(flow.num_classes, size, config["timesteps"], config["units"],
                                             weights=None, mixed_precision="auto")
        training.set_backbone_trainable(model, "xception", config["phase"] == 2)
        crc.compile_classifier(model, optimizer)
    return {"images_per_s": _fit_throughput(model, flow, config["steps"], batch)}


def child_phase1_whole(config):
    """A whole phase 1 (``config["epochs"]`` epochs over the images, no validation, no
    checkpoints) at the seed configuration, seconds from the first image read to the last
    step. ``seed``: the seed's way (a plain ``ImageDataGenerator`` subclass, ``keras.layers.LSTM``,
    float32, Xception run on every image every epoch). ``cached``: what ``cnn_rnn_classifier.py
    train`` does with its default flags (``phase1_inputs``): each image's Xception features
    computed once (mixed_bfloat16 Xception where the CPU has it), then ``classifier_head``
    (``FusedLSTM``) trained on them and the images."""
    import keras
    import tensorflow as tf

    import cnn_rnn_classifier as crc
    from helpers import data, training
    from helpers import features as featurecache

    batch, epochs = 16, config["epochs"]
    start = time.perf_counter()
    if config["path"] == "seed":
        class SeedGenerator(tf.keras.preprocessing.image.ImageDataGenerator):
            def standardize(self, x):
                return keras.applications.xception.preprocess_input(super().standardize(x))

        flow = SeedGenerator().flow_from_directory(config["data"], target_size=(299, 299), batch_size=batch, seed=0)
        model = crc.build_cnn_rnn_classifier(flow.num_classes, weights=None, fused_lstm=False)
        training.set_backbone_trainable(model, "xception", False)
        model.compile(optimizer=keras.optimizers.RMSprop(), loss="categorical_crossentropy", metrics=["accuracy"])
        model.fit(flow, epochs=epochs, verbose=0)
        return {"seconds": time.perf_counter() - start}
    args = crc.parse_args(["train", "--data-dir", config["data"], "--batch-size", str(batch), "--weights", "none"])
    split = data.list_split(Path(config["data"]), None, "train")
    model = crc.build_cnn_rnn_classifier(len(split.class_names), weights=None,
                                         **crc.cli.model_arguments(args, crc.MODEL_ARGUMENTS))
    training.set_backbone_trainable(model, "xception", False)
    head = crc.classifier_head(model)
    with tempfile.TemporaryDirectory() as cache:
        features = featurecache.cached_features(model.get_layer("xception"), split.paths, cache, "train",
                                                images=lambda: crc.read_split(split, args, batch, False),
                                                reader=args.input)
    extracted = time.perf_counter() - start
    crc.compile_classifier(head, keras.optimizers.RMSprop())
    head.fit(crc.read_split(split, args, batch, True, features=features), epochs=epochs, verbose=0)
    return {"seconds": time.perf_counter() - start, "extraction_seconds": extracted}


def child_lrcn(config):
    """LRCN phase 1 as ``lrcn.py train --frames 16`` builds and compiles it (the baseline with
    ``--mixed-precision off``), clips/s."""
    import lrcn
    from helpers import cli, sequences, training

    split = sequences.list_sequences(config["data"])
    mixed = "off" if config["path"] == "baseline" else "auto"
    args = lrcn.parse_args(["train", "--data-dir", config["data"], "--frames", "16", "--weights", "none",
                            "--mixed-precision", mixed])
    data = sequences.FrameSequences(split, args.image_size, config["batch"], frames=args.frames, shuffle=True,
                                    workers=args.workers)
    model = lrcn.build_lrcn(num_classes=len(split.class_names), weights=None,
                            **cli.model_arguments(args, lrcn.MODEL_ARGUMENTS))
    training.set_backbone_trainable(model, lrcn.BACKBONE, False)
    lrcn.compile_lrcn(model, lrcn.phase1_optimizer(args.learning_rate, args.recipe))
    return {"clips_per_s": _fit_throughput(model, data, config["steps"], config["batch"])}


def child_components(config):
    """Where a seed-configuration step spends its time: seconds per batch of 16 for the
    Xception backbone (forward; forward + backward) in float32 and mixed_bfloat16, and
    the RNN branch (2 x LSTM(2048) on 23 x 3887, forward + backward) with
    ``keras.layers.LSTM`` and ``FusedLSTM``. Median of 5 after 2 warm-up calls."""
    import keras
    import numpy as np
    import tensorflow as tf

    from helpers import precision
    from helpers.recurrent import FusedLSTM

    def seconds(function, x, repeats=5):
        for _ in range(2):
            tf.nest.map_structure(lambda t: t.numpy(), function(x))
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            tf.nest.map_structure(lambda t: t.numpy(), function(x))
            times.append(time.perf_counter() - start)
        return float(np.median(times))

    def forward_backward(model):
        @tf.function
        def step(x):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(tf.cast(model(x, training=False), "float32") ** 2)
            return tape.gradient(loss, model.trainable_weights)
        return step

    result = {}
    images = tf.random.uniform((16, 299, 299, 3), -1, 1)
    for policy in ("float32", "mixed_bfloat16"):
        with precision.policy_scope(policy):
            backbone = keras.applications.Xception(include_top=False, weights=None, input_shape=(299, 299, 3),
                                                   pooling="avg")
        result[f"backbone forward, {policy}"] = seconds(tf.function(lambda x: backbone(x, training=False)), images)
        result[f"backbone forward+backward, {policy}"] = seconds(forward_backward(backbone), images, repeats=3)
    steps = tf.random.uniform((16, 23, 3887), -1, 1)
    for name, layer in (("keras.layers.LSTM", keras.layers.LSTM), ("FusedLSTM", FusedLSTM)):
        inputs = keras.Input((23, 3887))
        branch = keras.Model(inputs, layer(2048)(layer(2048, return_sequences=True)(inputs)))
        result[f"RNN branch forward+backward, {name}"] = seconds(forward_backward(branch), steps)
    return result


def child_input(config):
    """Input path alone: decode, resize to 299, Xception preprocessing; batches of 16,
    two epochs, with N workers: the generator's batches in N threads (what
    ``PyDataset(workers=N)`` does), or the tf.data path with ``num_parallel_calls=N``."""
    from concurrent.futures import ThreadPoolExecutor

    import cnn_rnn_classifier as crc
    from helpers import data

    split = data.list_split(Path(config["data"]), None, "train")
    if config["path"] == "generator":
        flow = crc.flow_from_split(split, 299, 16, shuffle=True, seed=0)
        flow[0]
        start = time.perf_counter()
        with ThreadPoolExecutor(config["threads"]) as pool:
            images = sum(len(x) for x, _ in pool.map(flow.__getitem__, list(range(len(flow))) * 2))
    else:
        dataset = crc.tf_data_batches(split, 299, 16, shuffle=True, seed=0, workers=config["threads"])
        next(iter(dataset))
        start = time.perf_counter()
        images = sum(len(x) for x, _ in dataset.repeat(2))
    return {"images_per_s": images / (time.perf_counter() - start)}


def child_flops(config):
    """Forward FLOPs per image of the classifier at (image_size, timesteps, units)."""
    import keras
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2
    from tensorflow.python.profiler.model_analyzer import profile
    from tensorflow.python.profiler.option_builder import ProfileOptionBuilder

    size, steps, units, classes = config["image_size"], config["timesteps"], config["units"], 100
    backbone = keras.applications.Xception(include_top=False, weights=None, input_shape=(size, size, 3), pooling="avg")
    concrete = tf.function(lambda x: backbone(x, training=False)).get_concrete_function(
        tf.TensorSpec((1, size, size, 3), tf.float32))
    graph = convert_variables_to_constants_v2(concrete).graph
    backbone_flops = profile(graph, options=ProfileOptionBuilder(ProfileOptionBuilder.float_operation())
                             .with_empty_output().build()).total_float_ops
    width = size * size // steps
    lstm = 2 * 4 * units * (width + units) * steps + 2 * 4 * units * (2 * units) * steps
    head = lstm + (2 * 2048 * units if units != 2048 else 0) + 2 * units * classes

    return {"backbone_forward_flops": backbone_flops, "head_forward_flops": head}


def child_peak(config):
    """Best of 5 timings of a 4096x4096 matmul in float32 and bfloat16, FLOP/s (4096: large
    enough for oneDNN to engage AMX in bfloat16; 2048 x 2048 measured well below it here)."""
    import tensorflow as tf

    size = 4096

    def peak(dtype):
        a = tf.cast(tf.random.uniform((size, size)), dtype)
        matmul = tf.function(lambda m: tf.matmul(m, m))
        matmul(a).numpy()
        best = 0.0
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(3):
                matmul(a).numpy()
            best = max(best, 2 * size ** 3 * 3 / (time.perf_counter() - start))
        return best

    return {"float32_matmul_peak": peak(tf.float32), "bfloat16_matmul_peak": peak(tf.bfloat16)}


CHILDREN = {"classifier": child_classifier, "phase1_whole": child_phase1_whole, "lrcn": child_lrcn, "input": child_input, "flops": child_flops,
            "peak": child_peak, "components": child_components}


def run_child(kind, config):
    """Runs one measurement in a fresh process; returns its result plus its peak RSS in MiB."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    output = subprocess.run([sys.executable, __file__, "--child", kind, json.dumps(config)], env=env,
                            capture_output=True, text=True, cwd=ROOT)
    if output.returncode:
        raise RuntimeError(f"{kind} {config} failed:\n{output.stderr[-3000:]}")
    return json.loads(output.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- parent

def main(argv=None):
    parser = argparse.ArgumentParser(description="Measure throughput, FLOPs and memory side by side.")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per training measurement (default: 4)")
    parser.add_argument("--quick", action="store_true", help="skip the seed configuration and LRCN (default: off)")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the table here (default: print only)")
    parser.add_argument("--cache-images", type=int, default=480,
                        help="images of the whole-phase-1 measurement (--only cache); with fewer, the fixed "
                             "~10 s of model building weighs more (default: 480)")
    parser.add_argument("--only", choices=("classifier", "cache", "input", "lrcn"), default=None,
                        help="run only these measurements (default: all)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        result = CHILDREN[args.child[0]](json.loads(args.child[1]))
        result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return 0

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        write_images(scratch / "images")
        peaks = run_child("peak", {})
        configs = [("demo", 71, 71, 256, {1: 32, 2: 16})] if args.only in (None, "classifier") else []
        if configs and not args.quick:
            configs.insert(0, ("seed", 299, 23, 2048, {1: 16, 2: 16}))
        for name, size, steps, units, batches in configs:
            flops = {**run_child("flops", {"image_size": size, "timesteps": steps, "units": units}), **peaks}
            for phase in (1, 2):
                for path in ("baseline", "default"):
                    config = {"data": str(scratch / "images"), "image_size": size, "timesteps": steps, "units": units,
                              "batch": batches[phase], "phase": phase, "path": path, "steps": args.steps}
                    result = run_child("classifier", config)
                    train_flops = (flops["backbone_forward_flops"] + 3 * flops["head_forward_flops"] if phase == 1
                                   else 3 * (flops["backbone_forward_flops"] + flops["head_forward_flops"]))
                    achieved = train_flops * result["images_per_s"]
                    row = {"measurement": f"classifier {name} phase {phase} ({path})", "batch": batches[phase],
                           "images_per_s": round(result["images_per_s"], 2),
                           "train_gflop_per_image": round(train_flops / 1e9, 2),
                           "fraction_of_float32_peak": round(achieved / flops["float32_matmul_peak"], 3),
                           "fraction_of_bfloat16_peak": round(achieved / flops["bfloat16_matmul_peak"], 3),
                           "peak_rss_mib": round(result["peak_rss_mib"])}
                    print(json.dumps(row), flush=True)
                    rows.append(row)
        if not args.quick and args.only in (None, "cache"):
            write_images(scratch / "cache_images", classes=4, per_class=args.cache_images // 4)
            seconds = {}
            for path in ("seed", "cached"):
                result = run_child("phase1_whole", {"data": str(scratch / "cache_images"), "path": path, "epochs": 3})
                seconds[path] = result["seconds"]
                row = {"measurement": f"classifier seed phase 1, whole, 3 epochs of {args.cache_images} images ({path})",
                       "seconds": round(result["seconds"], 1), "peak_rss_mib": round(result["peak_rss_mib"])}
                if "extraction_seconds" in result:
                    row["extraction_seconds"] = round(result["extraction_seconds"], 1)
                    row["speedup"] = round(seconds["seed"] / seconds["cached"], 2)
                print(json.dumps(row), flush=True)
                rows.append(row)
        print(json.dumps({"measurement": "matmul peak (4096x4096)",
                          "float32_gflop_per_s": round(peaks["float32_matmul_peak"] / 1e9, 1),
                          "bfloat16_gflop_per_s": round(peaks["bfloat16_matmul_peak"] / 1e9, 1)}), flush=True)
        for path in ("generator", "tf.data") if args.only in (None, "input") else ():
            for threads in (1, 2):
                result = run_child("input", {"data": str(scratch / "images"), "threads": threads, "path": path})
                row = {"measurement": f"input path, {path}, {threads} worker(s)",
                       "images_per_s": round(result["images_per_s"], 1)}
                print(json.dumps(row), flush=True)
                rows.append(row)
        if not args.quick and args.only in (None, "lrcn"):
            write_clips(scratch / "clips")
            for path in ("baseline", "default"):
                result = run_child("lrcn", {"data": str(scratch / "clips"), "batch": 4, "steps": args.steps,
                                            "path": path})
                row = {"measurement": f"LRCN phase 1, 16 frames x 224 px ({path})", "batch": 4,
                       "clips_per_s": round(result["clips_per_s"], 3), "peak_rss_mib": round(result["peak_rss_mib"])}
                print(json.dumps(row), flush=True)
                rows.append(row)
            for name, value in run_child("components", {}).items() if args.only is None else ():
                if name != "peak_rss_mib":
                    row = {"measurement": f"seed step, {name}", "seconds_per_batch_of_16": round(value, 3)}
                    print(json.dumps(row), flush=True)
                    rows.append(row)

    machine = f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}"
    table = [f"Machine: {machine}. Matmul peak (4096x4096, best of 5): float32 "
             f"{peaks['float32_matmul_peak'] / 1e9:.0f} GFLOP/s, bfloat16 {peaks['bfloat16_matmul_peak'] / 1e9:.0f} GFLOP/s.", "", "| measurement | throughput | GFLOP/image | of fp32 peak | of bf16 peak | peak RSS |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        speed = (f"{row['images_per_s']} images/s" if "images_per_s" in row else f"{row['clips_per_s']} clips/s"
                 if "clips_per_s" in row else f"{row['seconds']} s" + (f" ({row['speedup']}x)" if "speedup" in row else "")
                 if "seconds" in row else f"{row['seconds_per_batch_of_16']} s per batch of 16")
        table.append(f"| {row['measurement']} | {speed} | {row.get('train_gflop_per_image', '')} | "
                     f"{row.get('fraction_of_float32_peak', '')} | {row.get('fraction_of_bfloat16_peak', '')} | "
                     f"{row.get('peak_rss_mib', '')} |")
    print("\n".join(table))
    if args.markdown:
        args.markdown.write_text("\n".join(table) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
