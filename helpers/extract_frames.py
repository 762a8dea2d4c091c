#!/usr/bin/env python
"""Turns video files (mp4, avi, ...) into frame folders for ``lrcn.py``, with OpenCV.

    python -m helpers.extract_frames VIDEO... --output DATA/train [--layout class-folders --label walk]
        [--fps 10] [--max-frames 64] [--size 224]

Each video becomes one sample folder of ``frame_00000.jpg``, ``frame_00001.jpg``, ...:

- ``--layout seed``: ``OUT/<label>_<video name>/`` (the seed's layout; ``--label`` is a number from 1);
- ``--layout class-folders``: ``OUT/<label>/<video name>/``.
"""

import argparse
import logging
import sys
from pathlib import Path

import cv2
import numpy as np

from helpers.errors import UsageError

logger = logging.getLogger(__name__)


class VideoError(UsageError):
    """A video file is missing or cannot be decoded."""


def read_video(path, fps=None, max_frames=None, size=None):
    """Decodes a video's frames.

    Args:
        path: the video file.
        fps: keep about this many frames per second (default: every frame). Frames are
            taken at the source's timestamps nearest to multiples of ``1 / fps``.
        max_frames: stop after this many frames (default: all).
        size: resize every frame to ``size x size`` pixels (default: keep).

    Returns:
        uint8 array ``(frames, height, width, 3)``, RGB.

    Raises:
        VideoError: the file is missing, cannot be opened, or yields no frame.
    """
    path = Path(path)
    if not path.is_file():
        raise VideoError(f"Video file {path} does not exist.")
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise VideoError(f"{path} cannot be opened as a video (unknown format or corrupt).")
    source_fps = capture.get(cv2.CAP_PROP_FPS) or 0.0
    step = source_fps / fps if fps and source_fps > 0 else 1.0
    frames, index, next_kept = [], 0, 0.0
    try:
        while max_frames is None or len(frames) < max_frames:
            ok, frame = capture.read()
            if not ok:
                break
            if index >= next_kept - 1e-6:
                frame = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
                if size:
                    frame = cv2.resize(frame, (size, size), interpolation=cv2.INTER_AREA)
                frames.append(frame)
                next_kept += step
            index += 1
    finally:
        capture.release()
    if not frames:
        raise VideoError(f"{path} holds no decodable frame.")
    return np.stack(frames)


def write_frames(frames, folder):
    """Writes RGB frames as ``frame_00000.jpg``... into ``folder`` (created); returns the count."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(frames):
        if not cv2.imwrite(str(folder / f"frame_{i:05d}.jpg"), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR)):
            raise OSError(f"Could not write {folder / f'frame_{i:05d}.jpg'}")
    return len(frames)


def sample_folder(output, layout, label, video):
    """Where a video's frames go in either layout."""
    name = Path(video).stem
    return Path(output) / (f"{label}_{name}" if layout == "seed" else Path(str(label)) / name)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Extract video frames into LRCN sample folders.")
    parser.add_argument("videos", nargs="+", type=Path, help="video files (mp4, avi, ...)")
    parser.add_argument("--output", required=True, type=Path, help="split folder to write into; required")
    parser.add_argument("--layout", choices=("seed", "class-folders"), default="class-folders",
                        help="seed: OUT/<label>_<video>/; class-folders: OUT/<label>/<video>/ (default: class-folders)")
    parser.add_argument("--label", required=True, help="the videos' label (a number from 1 for --layout seed); required")
    parser.add_argument("--fps", type=float, default=None, help="frames kept per second (default: all)")
    parser.add_argument("--max-frames", type=int, default=None, help="frames per video at most (default: all)")
    parser.add_argument("--size", type=int, default=None, help="resize frames to SIZE x SIZE (default: keep)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.layout == "seed" and not (args.label.isdigit() and int(args.label) >= 1):
        parser.error(f"--layout seed needs a numeric --label from 1. Received: {args.label}")
    try:
        for video in args.videos:
            frames = read_video(video, args.fps, args.max_frames, args.size)
            folder = sample_folder(args.output, args.layout, args.label, video)
            logger.info("%s: %d frames -> %s", video, write_frames(frames, folder), folder)
    except (VideoError, OSError) as error:
        logger.error("error: %s", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
