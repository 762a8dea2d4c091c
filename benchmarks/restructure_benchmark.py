#!/usr/bin/env python
"""Seconds to restructure a tree the size of tiny-imagenet-200: ours against the original's approach.

Run by hand, never part of pass/fail::

    python benchmarks/restructure_benchmark.py [--scale 1.0] [--workdir /tmp/restructure-bench]

It writes a raw Tiny ImageNet tree of real 64x64 JPEG files (200 classes x 500
train, 10,000 val, 10,000 test at ``--scale 1``), then, in the same run, times:

- ``restructure(src, output=...)``: this repository's tool, default mode (hard links, no decoding);
- ``restructure(copy, in_place=True)``: in place, like the original (folder renames where possible),
  on a hard-linked copy of the raw tree made beforehand (``cp -al``, not timed);
- the original script's approach: every image opened and saved again with PIL
  into the new layout (without deleting the source, which only adds time).

It prints one JSON object per measurement and the ratio.
"""

import argparse
import io
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers.restructure_dataset import restructure  # noqa: E402


def make_raw_tree(root, classes, train_per_class, val, test, seed=0):
    """Raw Tiny ImageNet layout with 64 distinct real JPEG encodings, cycled."""
    rng = np.random.default_rng(seed)
    encoded = []
    for _ in range(64):
        buffer = io.BytesIO()
        pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        encoded.append(buffer.getvalue())
    wnids = [f"n{index:08d}" for index in range(classes)]
    root.mkdir(parents=True)
    (root / "wnids.txt").write_text("".join(f"{w}\n" for w in wnids))
    (root / "words.txt").write_text("".join(f"{w}\tclass {i}\n" for i, w in enumerate(wnids)))
    count = 0
    for w in wnids:
        folder = root / "train" / w / "images"
        folder.mkdir(parents=True)
        for i in range(train_per_class):
            (folder / f"{w}_{i}.JPEG").write_bytes(encoded[count % 64])
            count += 1
        (root / "train" / w / f"{w}_boxes.txt").write_text("")
    (root / "val" / "images").mkdir(parents=True)
    rows = []
    for i in range(val):
        (root / "val" / "images" / f"val_{i}.JPEG").write_bytes(encoded[i % 64])
        rows.append(f"val_{i}.JPEG\t{wnids[i % classes]}\t0\t0\t63\t63\n")
    (root / "val" / "val_annotations.txt").write_text("".join(rows))
    (root / "test" / "images").mkdir(parents=True)
    for i in range(test):
        (root / "test" / "images" / f"test_{i}.JPEG").write_bytes(encoded[i % 64])
    return count + val + test


def original_approach(src, output):
    """What the seed's script did per image: open with PIL, save under the new layout."""
    annotations = {}
    for line in (src / "val" / "val_annotations.txt").read_text().splitlines():
        name, wnid = line.split("\t")[:2]
        annotations[name] = wnid
    for wnid_dir in sorted((src / "train").iterdir()):
        target = output / "train" / wnid_dir.name
        target.mkdir(parents=True)
        for path in sorted((wnid_dir / "images").iterdir()):
            Image.open(path).save(target / path.name)
    for path in sorted((src / "val" / "images").iterdir()):
        target = output / "val" / annotations[path.name]
        target.mkdir(parents=True, exist_ok=True)
        Image.open(path).save(target / path.name)
    target = output / "test_unlabelled"
    target.mkdir(parents=True)
    for path in sorted((src / "test" / "images").iterdir()):
        Image.open(path).save(target / path.name)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of tiny-imagenet-200's size (default: 1.0)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/restructure-bench"),
                        help="scratch folder, deleted first (default: /tmp/restructure-bench)")
    args = parser.parse_args(argv)
    shutil.rmtree(args.workdir, ignore_errors=True)
    src = args.workdir / "raw"
    files = make_raw_tree(src, 200, int(500 * args.scale), int(10_000 * args.scale), int(10_000 * args.scale))

    start = time.perf_counter()
    summary = restructure(src, output=args.workdir / "ours")
    ours = time.perf_counter() - start
    print(json.dumps({"measurement": "restructure_dataset.py (hard links)", "files": files,
                      "seconds": round(ours, 2), "images": summary.images}))

    subprocess.run(["cp", "-al", str(src), str(args.workdir / "in_place")], check=True)
    start = time.perf_counter()
    restructure(args.workdir / "in_place", in_place=True)
    in_place = time.perf_counter() - start
    print(json.dumps({"measurement": "restructure_dataset.py --in-place (renames)", "files": files,
                      "seconds": round(in_place, 2)}))

    start = time.perf_counter()
    original_approach(src, args.workdir / "original")
    original = time.perf_counter() - start
    print(json.dumps({"measurement": "original approach (PIL open + save)", "files": files,
                      "seconds": round(original, 2)}))
    print(json.dumps({"measurement": "speed-up, --output", "ratio": round(original / ours, 1)}))
    print(json.dumps({"measurement": "speed-up, --in-place", "ratio": round(original / in_place, 1)}))
    shutil.rmtree(args.workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
