#!/usr/bin/env python
"""Writes clips of real Fashion-MNIST photos moving left, right, up or down, as frame folders.

The demo data for ``lrcn.py``: ``OUT/<split>/<direction>/clip_<i>/frame_<t>.png``.
Run it from the repository root: ``python -m helpers.moving_fashion_mnist OUT``.
Each clip moves one product photo (28x28) across a black ``--size`` canvas, from edge
to edge, at a random offset on the other axis. Any single frame is equally likely in
every class, so only the order of the frames gives the label: a model that scores
above chance (25%) reads the sequence, and shuffling the frames should bring it
back to chance.

Train clips use Fashion-MNIST's training photos; val and test clips its test photos.
"""

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from helpers.errors import UsageError
from helpers.fashion_mnist_tiny_imagenet import load_fashion_mnist, new_folder

logger = logging.getLogger(__name__)

DIRECTIONS = ("down", "left", "right", "up")
ITEM = 28


def clip(photo, direction, frames, size, offset):
    """``(frames, size, size)`` uint8: ``photo`` crossing the canvas in ``direction``."""
    travel = np.round(np.linspace(0, size - ITEM, frames)).astype(int)
    if direction in ("left", "up"):
        travel = travel[::-1]
    canvas = np.zeros((frames, size, size), np.uint8)
    for t, position in enumerate(travel):
        row, col = (position, offset) if direction in ("up", "down") else (offset, position)
        canvas[t, row:row + ITEM, col:col + ITEM] = photo
    return canvas


def write_clips(output, per_class=(100, 25, 25), frames=8, size=64, seed=0, source=None):
    """Writes train/val/test clips; returns ``{split: clip count}``.

    Raises:
        FileExistsError: ``output`` exists and is not empty.
    """
    output = new_folder(output)
    (x_train, _), (x_test, _) = load_fashion_mnist(*([source] if source else []))
    rng = np.random.default_rng(seed)
    counts = {}
    for split, count, photos in zip(("train", "val", "test"), per_class, (x_train, x_test, x_test)):
        for direction in DIRECTIONS:
            for i in range(count):
                photo = photos[rng.integers(len(photos))]
                folder = output / split / direction / f"clip_{i}"
                folder.mkdir(parents=True)
                for t, frame in enumerate(clip(photo, direction, frames, size, rng.integers(0, size - ITEM + 1))):
                    Image.fromarray(frame).save(folder / f"frame_{t}.png")
        counts[split] = count * len(DIRECTIONS)
    logger.info("wrote %s clips of %d frames to %s", counts, frames, output)
    return counts


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write moving Fashion-MNIST clips as frame folders.")
    parser.add_argument("output", type=Path, help="new folder for the clips")
    parser.add_argument("--train-per-class", type=int, default=100, help="train clips per direction (default: 100)")
    parser.add_argument("--eval-per-class", type=int, default=25, help="val and test clips per direction (default: 25)")
    parser.add_argument("--frames", type=int, default=8, help="frames per clip (default: 8)")
    parser.add_argument("--size", type=int, default=64, help="canvas size in pixels, >= 28 (default: 64)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.size < ITEM:
        parser.error(f"--size must be at least {ITEM}. Received: {args.size}")
    try:
        write_clips(args.output, (args.train_per_class, args.eval_per_class, args.eval_per_class),
                    args.frames, args.size, args.seed)
    except (FileExistsError, RuntimeError, UsageError) as error:
        logger.error("error: %s", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
