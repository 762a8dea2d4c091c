#!/usr/bin/env python
"""Prepares what ``benchmarks/gpu_check.py`` needs on a GPU box that cannot download: one folder
of at most 64 MiB that travels with the repository.

    python benchmarks/prepare_gpu_check.py --output .gpu_check [--tiny-imagenet ../shared/tiny-imagenet-100]
        [--weights ../shared/weights/xception_imagenet_notop.weights.h5] [--classes 10]

Writes ``--output`` (ignored by git): a new or empty folder, or one this script wrote before (it
holds the script's marker file), which is replaced; any other folder is refused. Every argument is
judged first, and the folder is written aside and renamed into place once whole, so a failure
leaves ``--output`` as it was. It holds:

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
import tempfile
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


MARKER = ".prepare_gpu_check"  # in every folder this script wrote: the only kind it replaces


def check_arguments(args):
    """Judges every argument and the output path before anything is written.

    Returns:
        ``None``, or the one-line reason the run cannot start.
    """
    wnids_file = args.tiny_imagenet / "wnids.txt"
    if not wnids_file.is_file() or not (args.tiny_imagenet / "val" / "val_annotations.txt").is_file():
        return (f"--tiny-imagenet {args.tiny_imagenet} is not a raw Tiny ImageNet download "
                "(wnids.txt and val/val_annotations.txt are needed)")
    available = len(wnids_file.read_text().split())
    if not 1 <= args.classes <= available:
        return f"--classes must be in [1, {available}] (the classes of {args.tiny_imagenet}). Received: {args.classes}"
    if not args.weights.is_file():
        return f"--weights {args.weights} does not exist (no-top Xception ImageNet weights, .weights.h5)"
    output = args.output
    if output.exists() and not output.is_dir():
        return f"--output {output} is a file, not a folder"
    if output.is_dir() and any(output.iterdir()) and not (output / MARKER).is_file():
        return (f"--output {output} is a folder this script did not write (no {MARKER} in it); "
                "choose a new or empty folder")
    sys.path.insert(0, str(ROOT))
    from helpers import rundir
    from helpers.errors import UsageError

    try:  # a file can be created where --output goes (probed: the folder is written beside it, then renamed)
        rundir.check_writable(output, "--output", folder=True, empty=False)
    except UsageError as error:
        return str(error)
    return None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", type=Path, default=ROOT / ".gpu_check",
                        help="the folder to write: new, empty, or written before by this script (default: .gpu_check)")
    parser.add_argument("--tiny-imagenet", type=Path, default=ROOT.parent / "shared" / "tiny-imagenet-100",
                        help="the raw tiny-imagenet-100 download (default: ../shared/tiny-imagenet-100)")
    parser.add_argument("--weights", type=Path,
                        default=ROOT.parent / "shared" / "weights" / "xception_imagenet_notop.weights.h5",
                        help="no-top Xception ImageNet weights (default: ../shared/weights/...)")
    parser.add_argument("--classes", type=int, default=10, help="classes of the subset (default: 10)")
    args = parser.parse_args(argv)
    problem = check_arguments(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    # Everything goes into a folder beside --output and is renamed into place once whole: a failure
    # or a kill leaves --output as it was, and the half-written folder is removed.
    output = args.output.resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.partial-"))
    try:
        (partial / MARKER).write_text("written by benchmarks/prepare_gpu_check.py\n")
        download_wheels(partial / "wheels")
        half_weights(args.weights, partial / "xception_notop.float16.weights.h5")
        tiny_imagenet_subset(args.tiny_imagenet, partial / "tiny-imagenet-subset", args.classes)
        size = sum(p.stat().st_size for p in partial.rglob("*") if p.is_file())
        print(f"{args.output}: {size / 2**20:.1f} MiB (limit {LIMIT / 2**20:.0f} MiB)")
        if size > LIMIT:
            print(f"error: too large to travel ({size / 2**20:.1f} MiB): use fewer --classes; {args.output} "
                  "is left as it was", file=sys.stderr)
            return 1
        if output.exists():  # empty, or written by this script (check_arguments)
            shutil.rmtree(output)
        partial.rename(output)
    except (OSError, subprocess.CalledProcessError) as error:
        print(f"error: {error}; {args.output} is left as it was", file=sys.stderr)
        return 1
    finally:
        if partial.exists():
            shutil.rmtree(partial, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
