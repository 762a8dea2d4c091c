#!/usr/bin/env python
"""Turns video files (mp4, avi, ...) into frame folders for ``lrcn.py``, with OpenCV.

    python -m helpers.extract_frames VIDEO... --output DATA/train [--layout class-folders --label walk]
        [--fps 10] [--max-frames 64] [--size 224]
    python -m helpers.extract_frames VIDEOS_DIR --output DATA [--val-fraction 0.2 --test-fraction 0.3]
        [--fps 10] [--max-frames 64] [--size 224]

Each video becomes one sample folder of ``frame_00000.jpg``, ``frame_00001.jpg``, ...:

- ``--layout seed``: ``OUT/<label>_<video name>/`` (the seed's layout; ``--label`` is a number from 1);
- ``--layout class-folders``: ``OUT/<label>/<video name>/``.

A folder argument is read as class folders of videos (``VIDEOS_DIR/<class>/*.mp4``, the
class from each folder's name): the whole dataset in one call, with a progress bar. With
``--val-fraction``/``--test-fraction`` it is split into ``OUT/train|val|test/<class>/<video>/``
**by group**: UCF101 names its clips ``v_<Class>_g<group>_c<clip>``, and clips of one group
share actor and scene, so a group never spans two splits (a video without ``_g<N>_`` is a
group of its own). A video that cannot be decoded is named in the log and skipped; the run
ends with the count of skipped videos (exit code 0 when at least one video per class was
written, else 1).
"""

import argparse
import logging
import math
import re
import shutil
import sys
from pathlib import Path

import cv2
import numpy as np

from helpers import rundir
from helpers.errors import UsageError
from helpers.video import VideoError, read_video  # noqa: F401 (re-exported: the tool's API)

logger = logging.getLogger(__name__)


SOURCE = ".source"  # in each sample folder: the video its frames come from


def write_frames(frames, folder, source=None):
    """Writes RGB frames as ``frame_00000.jpg``... into the sample folder ``folder``, whole and fresh.

    The frames are written into a hidden folder beside it (``.<name>.partial``, which the frame
    readers skip) that is then renamed into place; a folder already there (an earlier
    extraction) is renamed aside first and removed after, so the sample never mixes frames of
    two extractions, and a kill leaves the old sample or the new one (and a hidden leftover
    that the next run replaces).

    Args:
        frames: uint8 ``(frames, height, width, 3)`` RGB.
        folder: the sample folder.
        source: the video the frames come from, recorded in the folder (``SOURCE``): a folder
            already holding another video's frames is refused, not replaced.

    Returns:
        The number of frames written.

    Raises:
        UsageError: ``folder`` holds the frames of another video (both named).
        OSError: a frame could not be written (nothing of the old sample is lost).
    """
    folder = Path(folder)
    if source is not None:
        source = str(Path(source).resolve())
        recorded = folder / SOURCE
        earlier = recorded.read_text(encoding="utf-8", errors="replace").strip() if recorded.is_file() else source
        if earlier != source:
            raise UsageError(f"{folder} holds the frames of {earlier}, not of {source}; rename the video or write "
                             "to another --output.")
    partial, old = folder.with_name(f".{folder.name}.partial"), folder.with_name(f".{folder.name}.old")
    for leftover in (partial, old):
        shutil.rmtree(leftover, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        for i, frame in enumerate(frames):
            if not cv2.imwrite(str(partial / f"frame_{i:05d}.jpg"), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR)):
                raise OSError(f"Could not write {folder / f'frame_{i:05d}.jpg'}")
        if source is not None:
            (partial / SOURCE).write_text(source + "\n", encoding="utf-8")
        if folder.exists():
            folder.rename(old)
        partial.rename(folder)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return len(frames)


def check_sample_names(pairs):
    """Refuses videos whose frames would land in one sample folder.

    Args:
        pairs: ``(video, sample folder)`` for every video of the call.

    Raises:
        UsageError: naming the two videos and their one folder (``a.mp4`` and ``a.avi`` both
            become ``<label>/a``), before anything is written.
    """
    seen = {}
    for video, folder in pairs:
        key = Path(folder).resolve()
        if key in seen:
            raise UsageError(f"{seen[key]} and {video} would both be written to {folder}; rename one of them "
                             "(a sample folder is named after its video's file name without the extension).")
        seen[key] = video


def sample_folder(output, layout, label, video):
    """Where a video's frames go in either layout."""
    name = Path(video).stem
    return Path(output) / (f"{label}_{name}" if layout == "seed" else Path(str(label)) / name)


VIDEO_EXTENSIONS = (".avi", ".mkv", ".mov", ".mp4", ".mpeg", ".mpg", ".webm", ".wmv")
GROUP = re.compile(r"_g(\d+)_c\d+$")  # UCF101: v_<Class>_g<group>_c<clip>


def videos_by_class(root):
    """``{class: [video paths]}`` of a folder of class folders of videos, both sorted.

    Raises:
        UsageError: no class folder holds a video file.
    """
    classes = {}
    for folder in sorted(p for p in Path(root).iterdir() if p.is_dir()):
        videos = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS)
        if videos:
            classes[folder.name] = videos
    if not classes:
        raise UsageError(f"{root} holds no class folders of videos ({', '.join(VIDEO_EXTENSIONS)}).")
    return classes


def group_of(video):
    """A video's group: UCF101's ``g<N>`` from ``v_<Class>_g<N>_c<M>``, else the video's own name."""
    match = GROUP.search(Path(video).stem)
    return f"g{int(match.group(1)):02d}" if match else Path(video).stem


def split_by_group(videos, val_fraction, test_fraction, seed=0):
    """Assigns one class's videos to ``train``/``val``/``test`` by whole groups.

    The groups are taken in a random order (``seed``); each goes to test while that brings
    test closer to ``test_fraction * videos`` videos, else to val likewise, else to train.

    Returns:
        ``{video: split}``.

    Raises:
        UsageError: train would get no video (too few groups for the fractions).
    """
    groups = {}
    for video in videos:
        groups.setdefault(group_of(video), []).append(video)
    order = sorted(groups)
    np.random.default_rng(seed).shuffle(order)
    wanted = {"test": test_fraction * len(videos), "val": val_fraction * len(videos)}
    assigned, taken = {}, {"test": 0, "val": 0}
    for group in order:
        size = len(groups[group])
        closer = [s for s in ("test", "val") if abs(taken[s] + size - wanted[s]) < abs(taken[s] - wanted[s])]
        split = closer[0] if closer else "train"
        taken[split] = taken.get(split, 0) + size
        assigned.update({video: split for video in groups[group]})
    if "train" not in assigned.values():
        raise UsageError(f"{Path(videos[0]).parent}: {len(groups)} groups are too few for --val-fraction "
                         f"{val_fraction} and --test-fraction {test_fraction}: none is left for training.")
    return assigned


def extract_dataset(root, output, fps=None, max_frames=None, size=None, val_fraction=0.0, test_fraction=0.0,
                    seed=0):
    """Writes the frame folders of every video of a folder of class folders (one call).

    Args:
        root: ``<root>/<class>/<video>``.
        output: ``<output>/<class>/<video>/frame_*.jpg``, or with a split,
            ``<output>/<split>/<class>/<video>/frame_*.jpg`` (``split_by_group``).
        fps, max_frames, size: as for ``read_video``.

    Returns:
        ``(written, skipped)``: the count of videos written, and the ``(video, reason)``
        of each one skipped because it could not be decoded.

    Raises:
        UsageError: no videos, too few groups for the split, or a class left without a
            training video after the skips.
    """
    import keras  # the progress bar; imported here, the single-file mode does without it

    classes = videos_by_class(root)
    split = val_fraction > 0 or test_fraction > 0
    plan = []
    for name, videos in classes.items():
        assigned = split_by_group(videos, val_fraction, test_fraction, seed) if split else {}
        plan += [(name, video, assigned.get(video)) for video in videos]
    folders = {video: Path(output, *(part,) if part else (), name, video.stem) for name, video, part in plan}
    check_sample_names(folders.items())
    planned = {folder.resolve() for folder in folders.values()}
    depth = "*/*/*" if split else "*/*"
    stale = sorted(p for p in Path(output).glob(depth) if p.is_dir() and not p.name.startswith(".")
                   and p.resolve() not in planned)
    if stale:
        raise UsageError(f"{output} holds {len(stale)} sample folders this extraction would not write (e.g. "
                         f"{stale[0]}): an earlier one with other videos or split fractions, whose clips could end "
                         "up in two splits. Use a new or empty --output.")
    progress = keras.utils.Progbar(len(plan), unit_name="video")
    written, skipped, trained = 0, [], set()
    for name, video, part in plan:
        try:
            frames = read_video(video, fps, max_frames, size)
        except VideoError as error:
            logger.warning("skipped: %s", error)
            skipped.append((video, str(error)))
        else:
            write_frames(frames, folders[video], source=video)
            written += 1
            if part in (None, "train"):
                trained.add(name)
        progress.add(1)
    missing = sorted(set(classes) - trained)
    if missing:
        raise UsageError(f"no training video of {', '.join(missing)} could be decoded ({len(skipped)} skipped).")
    return written, skipped


def main(argv=None):
    parser = argparse.ArgumentParser(description="Extract video frames into LRCN sample folders.")
    parser.add_argument("videos", nargs="+", type=Path,
                        help="video files (mp4, avi, ...), or one folder of class folders of videos")
    parser.add_argument("--output", required=True, type=Path,
                        help="split folder to write into (a dataset root for a folder of class folders); required")
    parser.add_argument("--layout", choices=("seed", "class-folders"), default="class-folders",
                        help="seed: OUT/<label>_<video>/; class-folders: OUT/<label>/<video>/ (default: class-folders)")
    parser.add_argument("--label", help="the video files' label (a number from 1 for --layout seed); required "
                        "for video files")
    parser.add_argument("--fps", type=float, default=None, help="frames kept per second (default: all)")
    parser.add_argument("--max-frames", type=int, default=None, help="frames per video at most (default: all)")
    parser.add_argument("--size", type=int, default=None, help="resize frames to SIZE x SIZE (default: keep)")
    parser.add_argument("--val-fraction", type=float, default=0.0,
                        help="folder of class folders: share of each class's videos for val/, whole groups "
                        "(default: 0, no split)")
    parser.add_argument("--test-fraction", type=float, default=0.0,
                        help="likewise for test/ (default: 0)")
    parser.add_argument("--seed", type=int, default=0, help="the order groups are assigned in (default: 0)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for flag, value, bound in (("--fps", args.fps, 0), ("--max-frames", args.max_frames, 1), ("--size", args.size, 1)):
        if value is not None and not (value > 0 if bound == 0 else value >= bound):
            parser.error(f"{flag} must be {'> 0' if bound == 0 else '>= 1'}. Received: {value}")
    if args.fps is not None and not math.isfinite(args.fps):
        parser.error(f"--fps must be a finite number. Received: {args.fps}")
    if not (0 <= args.val_fraction < 1 and 0 <= args.test_fraction < 1 and args.val_fraction + args.test_fraction < 1):
        parser.error(f"--val-fraction and --test-fraction must be in [0, 1) with a sum below 1. "
                     f"Received: {args.val_fraction}, {args.test_fraction}")
    try:
        rundir.check_writable(args.output, "--output", folder=True, empty=False)  # before any video is read
        if len(args.videos) == 1 and args.videos[0].is_dir():
            written, skipped = extract_dataset(args.videos[0], args.output, args.fps, args.max_frames, args.size,
                                               args.val_fraction, args.test_fraction, args.seed)
            logger.info("%d videos written to %s; %d skipped%s", written, args.output, len(skipped),
                        "".join(f"\n  {video}: {reason}" for video, reason in skipped))
            return 0
        if args.label is None:
            parser.error("--label is required for video files (a folder of class folders takes its classes from "
                         "the folder names)")
        if args.layout == "seed" and not (args.label.isdigit() and int(args.label) >= 1):
            parser.error(f"--layout seed needs a numeric --label from 1. Received: {args.label}")
        folders = {video: sample_folder(args.output, args.layout, args.label, video) for video in args.videos}
        if len(folders) < len(args.videos):
            repeated = next(v for v in args.videos if args.videos.count(v) > 1)
            raise UsageError(f"{repeated} is given twice.")
        check_sample_names(folders.items())
        for video, folder in folders.items():
            frames = read_video(video, args.fps, args.max_frames, args.size)
            logger.info("%s: %d frames -> %s", video, write_frames(frames, folder, source=video), folder)
    except (UsageError, OSError) as error:
        logger.error("error: %s", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
