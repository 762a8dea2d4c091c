#!/usr/bin/env python
"""Op-level profile of classifier training steps with TensorFlow's profiler.

Run by hand::

    pip install xprof        # reads the trace; not needed by the project itself
    python benchmarks/profile_step.py [--path baseline|default] [--phase 1|2] [--steps 2] [--logdir DIR]

Traces ``--steps`` train steps (after two untraced warm-up steps) of the classifier at
the seed configuration (299 px, 23 x 3887, LSTM 2048, batch 16, random weights),
writes the trace to ``--logdir`` (open it with TensorBoard's Profile tab), and prints
the self time per op type and the slowest ops. ``--path`` is as in
``throughput_benchmark.py``: ``baseline`` (keras.layers.LSTM, float32) or ``default``
(FusedLSTM, ``--mixed-precision auto``).
"""

import argparse
import collections
import glob
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def op_stats(logdir):
    """``[(op type, op name, occurrences, self time in us)]`` from the newest trace in ``logdir``."""
    from xprof.convert import raw_to_tool_data

    run = sorted(glob.glob(os.path.join(logdir, "plugins", "profile", "*")))[-1]
    data, _ = raw_to_tool_data.xspace_to_tool_data(glob.glob(os.path.join(run, "*.xplane.pb")),
                                                   "framework_op_stats", {})
    table = json.loads(data)[0]
    columns = [column["id"] for column in table["cols"]]
    rows = [dict(zip(columns, [cell.get("v") for cell in row["c"]])) for row in table["rows"]]
    return [(r["type"], r["operation"], r["occurrences"], r["total_self_time"]) for r in rows if r["type"] != "IDLE"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", choices=("baseline", "default"), default="default",
                        help="baseline or default path (default: default)")
    parser.add_argument("--phase", type=int, choices=(1, 2), default=1, help="training phase (default: 1)")
    parser.add_argument("--steps", type=int, default=2, help="traced steps (default: 2)")
    parser.add_argument("--logdir", default="/tmp/profile_step", help="trace folder (default: /tmp/profile_step)")
    parser.add_argument("--top", type=int, default=15, help="slowest ops listed (default: 15)")
    args = parser.parse_args(argv)

    import keras
    import numpy as np
    import tensorflow as tf

    import cnn_rnn_classifier as crc
    from helpers import training

    default = args.path == "default"
    model = crc.build_cnn_rnn_classifier(100, weights=None, fused_lstm=default,
                                         mixed_precision="auto" if default else "off")
    training.set_backbone_trainable(model, "xception", args.phase == 2)
    crc.compile_classifier(model, keras.optimizers.RMSprop() if args.phase == 1 else keras.optimizers.Adam(1e-4))
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (16, 299, 299, 3)).astype("float32")
    y = np.eye(100, dtype="float32")[rng.integers(0, 100, 16)]
    for _ in range(2):
        model.train_on_batch(x, y)
    tf.profiler.experimental.start(args.logdir)
    for _ in range(args.steps):
        model.train_on_batch(x, y)
    tf.profiler.experimental.stop()

    stats = op_stats(args.logdir)
    total = sum(s[3] for s in stats)
    by_type = collections.Counter()
    for kind, _, _, us in stats:
        by_type[kind] += us
    print(f"{args.path} path, phase {args.phase}: {total / 1e6 / args.steps:.2f} s of op self time per step")
    for kind, us in by_type.most_common(10):
        print(f"  {kind:45s} {us / 1e6 / args.steps:7.3f} s  {100 * us / total:5.1f}%")
    print("slowest ops:")
    for kind, name, count, us in sorted(stats, key=lambda s: -s[3])[:args.top]:
        print(f"  {us / 1e6 / args.steps:7.3f} s  {kind:30s} {name[:90]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
