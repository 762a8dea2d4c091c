#!/usr/bin/env python
"""``--distribute multi-worker`` on JAX over the loopback: the wall time of one process against
several, side by side in one run, on the same data and global batch.

Run by hand, never part of pass/fail::

    python benchmarks/processes_benchmark.py --processes 1 2 --output-root /tmp/bench -- \\
        cnn_rnn_classifier.py --data-dir DATA --weights W --image-size 71 --epochs 1 \\
        --fine-tune-epochs 0 --batch-size 32 --steps-per-epoch 20

Each count runs the script's ``train`` command (``KERAS_BACKEND=jax``, ``--distribute
multi-worker`` added, a fresh ``--output-dir`` under ``--output-root``) in that many processes
started at once with the ``KERAS_DISTRIBUTION_*`` variables, process 0 the coordinator on a free
loopback port; the time is from the start to the last process's exit, and phase 1's last logged
loss is reported beside it (the same work: the same figure). Prints one JSON line.
"""

import argparse
import csv
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(count, script_args, out):
    port, processes = free_port(), []
    start = time.perf_counter()
    for index in range(count):
        env = dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="2",
                   KERAS_DISTRIBUTION_JOB_ADDRESSES=f"127.0.0.1:{port}",
                   KERAS_DISTRIBUTION_NUM_PROCESSES=str(count), KERAS_DISTRIBUTION_PROCESS_ID=str(index))
        processes.append(subprocess.Popen(
            [sys.executable, *script_args, "--output-dir", str(out), "--distribute", "multi-worker"],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    errors = [p.communicate()[1] for p in processes]
    seconds = time.perf_counter() - start
    if any(p.returncode for p in processes):
        raise SystemExit(f"{count} process(es) failed:\n" + "\n".join(e[-2000:] for e in errors))
    with open(out / "phase1_log.csv", newline="") as file:
        loss = [float(row["loss"]) for row in csv.DictReader(file)][-1]
    return {"seconds": round(seconds, 1), "phase1_last_loss": loss}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="process counts (default: 1 2)")
    parser.add_argument("--output-root", type=Path, required=True, help="a folder for the runs' output folders; required")
    parser.add_argument("script_args", nargs=argparse.REMAINDER, help="-- SCRIPT.py and its train arguments")
    args = parser.parse_args(argv)
    script_args = [a for a in args.script_args if a != "--"]
    results = {"cpus": os.cpu_count()}
    for count in args.processes:
        results[f"{count} process(es)"] = run(count, script_args, args.output_root / f"processes_{count}")
        print(json.dumps({f"{count} process(es)": results[f"{count} process(es)"]}), flush=True)
    first, *rest = args.processes
    for count in rest:
        results[f"{count} over {first}"] = round(results[f"{count} process(es)"]["seconds"]
                                                 / results[f"{first} process(es)"]["seconds"], 2)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
