#!/usr/bin/env python
"""Writes a small real-image dataset in Tiny ImageNet's raw layout, from Fashion-MNIST.

Fashion-MNIST (Xiao et al., 2017, MIT licence) holds 70,000 real 28x28 grayscale
product photos in 10 classes. This script writes some of them as JPEG files in the
layout a Tiny ImageNet download has, so the demo exercises the whole path a user
takes: ``helpers/restructure_dataset.py``, then ``cnn_rnn_classifier.py``::

    OUT/wnids.txt, OUT/words.txt
    OUT/train/<wnid>/images/<wnid>_<i>.JPEG, OUT/train/<wnid>/<wnid>_boxes.txt
    OUT/val/images/val_<i>.JPEG, OUT/val/val_annotations.txt
    OUT/test/images/test_<i>.JPEG (unlabelled)

Train images come from Fashion-MNIST's training set; val and test images from
its test set, so no photo is in two splits. The images are read from the Debian
package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``) when it is
installed, else through ``keras.datasets.fashion_mnist`` (a download).
"""

import argparse
import gzip
import logging
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from helpers import rundir
from helpers.errors import UsageError

logger = logging.getLogger(__name__)

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
WNIDS = tuple(f"fm{index:02d}" for index in range(len(CLASS_NAMES)))


def _read_idx(path, offset):
    with gzip.open(path, "rb") as handle:
        return np.frombuffer(handle.read(), dtype=np.uint8, offset=offset)


def load_fashion_mnist(directory=DEBIAN_DIR):
    """Returns ``((x_train, y_train), (x_test, y_test))``: uint8 ``(n, 28, 28)`` images, 0..255, and int labels 0..9."""
    directory = Path(directory)
    if (directory / "train-images-idx3-ubyte.gz").is_file():
        logger.info("reading Fashion-MNIST from %s", directory)
        parts = []
        for prefix in ("train", "t10k"):
            images = _read_idx(directory / f"{prefix}-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
            labels = _read_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", 8).astype(np.int64)
            parts.append((images, labels))
        return tuple(parts)
    import keras  # only needed for the download

    logger.info("%s not found (apt-get install dataset-fashion-mnist); downloading with keras.datasets", directory)
    try:
        return keras.datasets.fashion_mnist.load_data()
    except Exception as error:
        raise RuntimeError(
            f"Fashion-MNIST is neither installed in {directory} nor downloadable ({error}). "
            "Install it with: apt-get install -y dataset-fashion-mnist"
        ) from error


def new_folder(output):
    """``Path(output)``, after checking it is absent or empty (nothing is overwritten).

    Raises:
        FileExistsError: ``output`` exists and is not empty.
        helpers.errors.UsageError: no file can be created where ``output`` goes.
    """
    output = Path(output)
    if output.exists() and any(output.iterdir()):
        raise FileExistsError(f"{output} exists and is not empty; choose a new folder or delete it.")
    rundir.check_writable(output, "the output folder", folder=True)  # a file can be created there
    return output


def _pick(labels, per_class, rng):
    """Indices of ``per_class`` random images of each class, in class order."""
    return [np.sort(rng.choice(np.flatnonzero(labels == c), per_class, replace=False)) for c in range(len(WNIDS))]


def write_dataset(output, train_per_class=300, val_per_class=50, test_images=200, seed=0, source=DEBIAN_DIR):
    """Writes the raw-layout dataset; returns the number of images written per split.

    Raises:
        FileExistsError: ``output`` exists and is not empty.
    """
    output = new_folder(output)
    (x_train, y_train), (x_test, y_test) = load_fashion_mnist(source)
    rng = np.random.default_rng(seed)
    output.mkdir(parents=True, exist_ok=True)
    (output / "wnids.txt").write_text("".join(f"{w}\n" for w in WNIDS))
    (output / "words.txt").write_text("".join(f"{w}\t{n}\n" for w, n in zip(WNIDS, CLASS_NAMES)))

    for wnid, indices in zip(WNIDS, _pick(y_train, train_per_class, rng)):
        folder = output / "train" / wnid / "images"
        folder.mkdir(parents=True)
        boxes = []
        for i, index in enumerate(indices):
            Image.fromarray(x_train[index]).save(folder / f"{wnid}_{i}.JPEG", quality=95)
            boxes.append(f"{wnid}_{i}.JPEG\t0\t0\t27\t27\n")
        (output / "train" / wnid / f"{wnid}_boxes.txt").write_text("".join(boxes))

    val_indices = np.concatenate(_pick(y_test, val_per_class, rng))
    rng.shuffle(val_indices)  # Tiny ImageNet's val images are not grouped by class
    (output / "val" / "images").mkdir(parents=True)
    rows = []
    for i, index in enumerate(val_indices):
        Image.fromarray(x_test[index]).save(output / "val" / "images" / f"val_{i}.JPEG", quality=95)
        rows.append(f"val_{i}.JPEG\t{WNIDS[y_test[index]]}\t0\t0\t27\t27\n")
    (output / "val" / "val_annotations.txt").write_text("".join(rows))

    unused = np.setdiff1d(np.arange(len(y_test)), val_indices)
    (output / "test" / "images").mkdir(parents=True)
    for i, index in enumerate(rng.choice(unused, test_images, replace=False)):
        Image.fromarray(x_test[index]).save(output / "test" / "images" / f"test_{i}.JPEG", quality=95)
    counts = {"train": train_per_class * len(WNIDS), "val": len(val_indices), "test_unlabelled": test_images}
    logger.info("wrote %s to %s", counts, output)
    return counts


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write Fashion-MNIST images in Tiny ImageNet's raw layout.")
    parser.add_argument("output", type=Path, help="new folder for the dataset")
    parser.add_argument("--train-per-class", type=int, default=300, help="train images per class (default: 300)")
    parser.add_argument("--val-per-class", type=int, default=50, help="val images per class (default: 50)")
    parser.add_argument("--test-images", type=int, default=200, help="unlabelled test images (default: 200)")
    parser.add_argument("--seed", type=int, default=0, help="which images are picked (default: 0)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        write_dataset(args.output, args.train_per_class, args.val_per_class, args.test_images, args.seed)
    except (FileExistsError, RuntimeError, UsageError) as error:
        logger.error("error: %s", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
