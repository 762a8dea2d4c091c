#!/usr/bin/env python
"""Prepares what ``benchmarks/gpu_check.py`` needs on a GPU box that cannot download: one folder
of at most 64 MiB that travels with the repository.

    python benchmarks/prepare_gpu_check.py --output .gpu_check [--tiny-imagenet ../shared/tiny-imagenet-100]
        [--weights ../shared/weights/xception_imagenet_notop.weights.h5] [--classes 10]

Writes into ``--output`` (ignored by git):

- ``wheels/``: the ``keras``, ``namex`` and ``optree`` wheels of this machine's versions for
  CPython 3.12 on x86-64 Linux (``pip download``; the box has JAX but not Keras);
- ``xception_notop.float16.weights.h5``: the no-top Xception ImageNet weights in float16 (about
  40 MB, half of the float32 file, which would not fit); ``gpu_check.py`` casts them back;
- ``tiny-imagenet-subset/``: the first ``--classes`` classes of tiny-imagenet-100 as class
  folders: 300 train, 25 val and 25 test images per class (the test images are the official
  val images the val split does not use, so they are labelled and held out).

On the box::

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu_check/wheels/*.whl
    PYTHONPATH=/tmp/site KERAS_BACKEND=jax python3 benchmarks/gpu_check.py --carried .gpu_check
"""

import argparse
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ("keras", "namex", "optree")
LIMIT = 64 * 2**20


def download_wheels(folder):
    folder.mkdir(parents=True, exist_ok=True)
    for name in WHEELS:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                        "--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
                        "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64", "-d", str(folder),
                        f"{name}=={metadata.version(name)}"], check=True)


def cast_weights(source, target, from_dtype, to_dtype):
    """Copies a Keras ``.weights.h5`` file, attributes included, with every ``from_dtype`` array
    stored as ``to_dtype`` (``half_weights`` here; ``gpu_check.py`` casts back to float32)."""
    import h5py

    with h5py.File(source) as read, h5py.File(target, "w") as written:
        def copy(name, item):
            if isinstance(item, h5py.Dataset):
                value = item[()]
                written.create_dataset(name, data=value.astype(to_dtype) if value.dtype == from_dtype else value)
            else:
                written.require_group(name)
            for key, value in item.attrs.items():
                written[name].attrs[key] = value

        read.visititems(copy)
        for key, value in read.attrs.items():
            written.attrs[key] = value


def half_weights(source, target):
    """Copies a Keras ``.weights.h5`` file with every float32 array stored as float16."""
    cast_weights(source, target, "float32", "float16")


def tiny_imagenet_subset(source, target, classes, train=300, val=25, test=25):
    """Class folders of the first ``classes`` wnids: ``train``/``val``/``test`` images per class."""
    wnids = source.joinpath("wnids.txt").read_text().split()[:classes]
    for wnid in wnids:
        images = sorted((source / "train" / wnid / "images").glob("*.JPEG"))[:train]
        (target / "train" / wnid).mkdir(parents=True, exist_ok=True)
        for image in images:
            shutil.copyfile(image, target / "train" / wnid / image.name)
    held = {}
    for line in source.joinpath("val", "val_annotations.txt").read_text().splitlines():
        name, wnid = line.split("\t")[:2]
        if wnid in wnids:
            held.setdefault(wnid, []).append(name)
    for wnid, names in held.items():
        for split, chosen in (("val", names[:val]), ("test", names[val:val + test])):
            (target / split / wnid).mkdir(parents=True, exist_ok=True)
            for name in chosen:
                shutil.copyfile(source / "val" / "images" / name, target / split / wnid / name)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", type=Path, default=ROOT / ".gpu_check", help="(default: .gpu_check)")
    parser.add_argument("--tiny-imagenet", type=Path, default=ROOT.parent / "shared" / "tiny-imagenet-100",
                        help="the raw tiny-imagenet-100 download (default: ../shared/tiny-imagenet-100)")
    parser.add_argument("--weights", type=Path,
                        default=ROOT.parent / "shared" / "weights" / "xception_imagenet_notop.weights.h5",
                        help="no-top Xception ImageNet weights (default: ../shared/weights/...)")
    parser.add_argument("--classes", type=int, default=10, help="classes of the subset (default: 10)")
    args = parser.parse_args(argv)
    if args.output.exists():
        shutil.rmtree(args.output)
    download_wheels(args.output / "wheels")
    half_weights(args.weights, args.output / "xception_notop.float16.weights.h5")
    tiny_imagenet_subset(args.tiny_imagenet, args.output / "tiny-imagenet-subset", args.classes)
    size = sum(p.stat().st_size for p in args.output.rglob("*") if p.is_file())
    print(f"{args.output}: {size / 2**20:.1f} MiB (limit {LIMIT / 2**20:.0f} MiB)")
    if size > LIMIT:
        print("too large to travel: use fewer --classes", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
