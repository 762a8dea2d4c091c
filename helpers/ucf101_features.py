#!/usr/bin/env python
"""UCF101 per-frame VGG16 fc6 features (MATLAB files) into the LRCN's feature-clip layout, once.

Input, the layout of the public feature release ``tyagi-iiitv/UCF101_release`` (the first 15
classes of UCF101, official split 1)::

    SRC/annos/videos_labels_subsets.txt    v_NNNNNN<TAB>class (1-101)<TAB>subset (1 train, 2 test)
    SRC/annos/actions.txt                  class number and name per line
    SRC/vgg16_relu6/v_NNNNNN.mat           key "Feature": (25, 4096) float32, VGG16 fc6 after ReLU,
                                           averaged over 5 crops, 25 frames spread over the video

Output, one ``.npy`` clip ``(frames, features)`` float16 per video, in the class folders
``lrcn.py train --data-dir OUT`` reads::

    OUT/train/<Class>/v_NNNNNN.npy
    OUT/val/<Class>/v_NNNNNN.npy       the last groups of each class's train videos
    OUT/test/<Class>/v_NNNNNN.npy      the official test split

A clip identical to a clip of another split is left out and printed with its twin: the official
test split stays whole, and a train copy of a test clip or a val copy of a test or train clip is
dropped (the release holds 12 pairs of identical clips, two of them across splits). Videos whose
features hold negative values are skipped (fc6 after ReLU is never negative; the
release's class 1 holds such placeholders) and counted, and so is a listed video without its
``.mat`` file; a class left without a train video is left out whole.

``val/`` is never a random split: UCF101's clips of one group are cuts of one video, and a random
split would put cuts of one video on both sides. The video ids run in each class's group order,
so the last ``--val-fraction`` of a class's train videos are its last groups; the cut is moved,
within ``BOUNDARY_SEARCH`` videos, to the consecutive pair whose frame-averaged features are the
least alike (cosine), which is where one group ends and the next begins (cuts of one video are
alike: 0.9-1.0 within a group, 0.4-0.7 across, measured on this release).

Each clip is written under a temporary name and renamed into place, and a clip already there
with the right shape is kept, so a killed conversion resumes with the same command and a second
run changes nothing. The figures (videos per split and class) are printed at the end.

Usage::

    python -m helpers.ucf101_features SRC --output OUT [--val-fraction 0.2]
"""

import argparse
import hashlib
import logging
import os
import sys
from pathlib import Path

import numpy as np

from helpers import rundir

logger = logging.getLogger(__name__)

LABELS = Path("annos") / "videos_labels_subsets.txt"
ACTIONS = Path("annos") / "actions.txt"
FEATURES = "vgg16_relu6"
MAT_KEY = "Feature"
TRAIN, TEST = "1", "2"
BOUNDARY_SEARCH = 3


class SourceError(ValueError):
    """The source folder is not the release's layout; the message names the file."""


def read_annotations(src):
    """``(videos, actions)``: ``[(video id, class number, subset), ...]`` in file order, and
    ``{class number: name}``.

    Raises:
        SourceError: a file is missing or a line is malformed (file and line named).
    """
    src = Path(src)
    for name in (LABELS, ACTIONS):
        if not (src / name).is_file():
            raise SourceError(f"{src / name} does not exist: SRC must be the UCF101 feature release "
                              f"(annos/, {FEATURES}/).")
    videos = []
    for number, line in enumerate((src / LABELS).read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 3 or not fields[1].isdigit() or fields[2] not in (TRAIN, TEST):
            raise SourceError(f"{src / LABELS}, line {number}: expected 'video class subset(1|2)'. Received: {line!r}")
        videos.append((fields[0], int(fields[1]), fields[2]))
    actions = {}
    for number, line in enumerate((src / ACTIONS).read_text().splitlines(), 1):
        fields = line.split()
        if fields:
            if len(fields) != 2 or not fields[0].isdigit():
                raise SourceError(f"{src / ACTIONS}, line {number}: expected 'number name'. Received: {line!r}")
            actions[int(fields[0])] = fields[1]
    return videos, actions


def read_features(path):
    """The ``(frames, features)`` float32 array of one ``.mat`` file, or ``None`` when it holds
    negative values (not fc6 after ReLU).

    Raises:
        SourceError: the file cannot be read or has no 2-D ``Feature``.
    """
    import scipy.io

    try:
        array = scipy.io.loadmat(path)[MAT_KEY]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise SourceError(f"{path} cannot be read as a MATLAB file with a {MAT_KEY!r} array ({error}).") from error
    if array.ndim != 2 or min(array.shape) < 1:
        raise SourceError(f"{path}: {MAT_KEY!r} must be (frames, features). Received: shape {array.shape}")
    array = np.asarray(array, np.float32)
    if not np.isfinite(array).all():
        raise SourceError(f"{path}: {MAT_KEY!r} holds NaN or infinite values.")
    return None if array.min() < 0 else array


def val_cut(clips, fraction):
    """Index where a class's train videos (in id order) split into train and val.

    The last ``fraction`` of the videos, with the cut moved to the nearest group boundary: the
    consecutive pair within ``BOUNDARY_SEARCH`` of it whose frame-averaged features have the
    lowest cosine similarity. At least one video stays on each side when there are two.

    Args:
        clips: ``(frames, features)`` arrays, in id order.
        fraction: in [0, 1).

    Returns:
        int in ``[1, len(clips)]``; ``len(clips)`` means no val video.
    """
    n = len(clips)
    if fraction <= 0 or n < 2:
        return n
    target = min(max(n - int(round(n * fraction)), 1), n - 1)
    means = np.stack([clip.mean(axis=0) for clip in clips])
    means /= np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)
    similarity = (means[1:] * means[:-1]).sum(axis=1)  # [i]: between video i and i + 1
    candidates = range(max(target - BOUNDARY_SEARCH, 1), min(target + BOUNDARY_SEARCH, n - 1) + 1)
    return min(candidates, key=lambda cut: (similarity[cut - 1], abs(cut - target)))


def _write_clip(path, clip):
    """Writes ``clip`` as float16 ``.npy`` under a temporary name, then renames it into place; a
    clip already there with the same shape is kept. Returns whether it was written."""
    if path.is_file():
        try:
            if np.load(path, mmap_mode="r").shape == clip.shape:
                return False
        except (OSError, ValueError):
            pass  # cut short by a kill: written again
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not rundir.write_atomically: its temporary name (v.partial.npy) would be read as a clip after a
    # kill; a hidden name is never listed (sequences._clip_files).
    partial = path.with_name(f".{path.name}.partial")
    with open(partial, "wb") as handle:
        np.save(handle, clip.astype(np.float16))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)
    return True


def convert(src, output, val_fraction=0.2):
    """Converts the release in ``src`` into ``output`` (the module docstring's layout).

    Args:
        src: the release's root (``annos/``, ``vgg16_relu6/``).
        output: the dataset folder to write (created; clips already there are kept).
        val_fraction: the share of each class's train videos carved into ``val/``, in [0, 1).

    Returns:
        ``{"counts": {split: {class: videos}}, "skipped": {class: (negative, missing)}, "written": n,
        "copies_left_out": [(split, video, twin's split, twin)]}``.

    Raises:
        SourceError: the layout is not the release's, or a file cannot be read.
        ValueError: ``val_fraction`` out of range.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"--val-fraction must be in [0, 1). Received: {val_fraction}")
    src, output = Path(src), Path(output)
    videos, actions = read_annotations(src)
    rundir.check_writable(output, "--output", folder=True, empty=False)  # before 2,000 files are read
    by_class = {}
    skipped = {}
    for video, number, subset in videos:
        name = actions.get(number, f"class{number:03d}")
        path = src / FEATURES / f"{video}.mat"
        negative, missing = skipped.get(name, (0, 0))
        if not path.is_file():
            skipped[name] = (negative, missing + 1)
            continue
        clip = read_features(path)
        if clip is None:
            skipped[name] = (negative + 1, missing)
            continue
        by_class.setdefault(name, {TRAIN: [], TEST: []})[subset].append((video, clip))
    counts = {"train": {}, "val": {}, "test": {}}
    planned = {}
    for name, subsets in by_class.items():
        train = subsets[TRAIN]
        if not train:
            logger.info("%s: left out, no train video", name)
            continue
        cut = val_cut([clip for _, clip in train], val_fraction)
        planned[name] = {"train": train[:cut], "val": train[cut:], "test": subsets[TEST]}
    copies = _leave_out_copies(planned)
    written = 0
    for name, splits in planned.items():
        for split, items in splits.items():
            counts[split][name] = len(items)
            for video, clip in items:
                written += _write_clip(output / split / name / f"{video}.npy", clip)
    return {"counts": counts, "skipped": {k: v for k, v in skipped.items() if any(v)}, "written": written,
            "copies_left_out": copies}


def _digest(clip):
    return hashlib.blake2b(np.ascontiguousarray(clip).tobytes(), digest_size=16).hexdigest()


def _leave_out_copies(planned):
    """Leaves out of ``planned`` (``{class: {split: [(video, clip)]}}``) every clip identical to one of
    an earlier split in the order test, train, val: the official test split stays whole, a train copy
    of a test clip and a val copy of a test or train clip are dropped (the release holds such
    pairs). Returns ``[(split, video, its twin's split, twin)]``."""
    seen, copies = {}, []
    for split in ("test", "train", "val"):
        for name, splits in planned.items():
            kept = []
            for video, clip in splits[split]:
                twin = seen.get(_digest(clip))
                if twin is not None and twin[0] != split:
                    copies.append((split, video, *twin))
                    continue
                seen.setdefault(_digest(clip), (split, video))
                kept.append((video, clip))
            splits[split] = kept
    return copies


def describe(summary):
    """The conversion's figures as printed lines: videos per class and split, totals, skips."""
    counts = summary["counts"]
    names = list(counts["train"])
    lines = [f"{'class':<20} {'train':>6} {'val':>6} {'test':>6}"]
    for name in names:
        lines.append(f"{name:<20} " + " ".join(f"{counts[s].get(name, 0):>6}" for s in ("train", "val", "test")))
    lines.append(f"{f'{len(names)} classes':<20} " + " ".join(f"{sum(counts[s].values()):>6}"
                                                               for s in ("train", "val", "test")))
    for name, (negative, missing) in summary["skipped"].items():
        lines.append(f"skipped {name}: {negative} with negative values (not fc6 after ReLU), {missing} without a "
                     ".mat file")
    for split, video, twin_split, twin in summary["copies_left_out"]:
        lines.append(f"left out of {split}: {video}, the same features as {twin} ({twin_split})")
    lines.append(f"{summary['written']} clips written, the others already there")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path, help="the release's root folder (annos/, vgg16_relu6/)")
    parser.add_argument("--output", type=Path, required=True, help="the dataset folder to write; required")
    parser.add_argument("--val-fraction", type=float, default=0.2,
                        help="share of each class's train videos (its last groups) carved into val/ (default: 0.2)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        summary = convert(args.src, args.output, val_fraction=args.val_fraction)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(describe(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
