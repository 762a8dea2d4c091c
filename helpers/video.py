"""The project's one video reader: OpenCV, one frame at a time.

``extract_frames`` (frame folders from videos), ``lrcn.classify`` and the predictions over time
(``helpers.timeline``) all read videos through ``video_frames``, which never holds more than one
frame: a video longer than memory is read as a stream.
"""

from pathlib import Path

import numpy as np

from helpers.errors import UsageError


class VideoError(UsageError):
    """A video file is missing or cannot be decoded."""


def video_frames(path, fps=None, max_frames=None, size=None):
    """Opens a video: ``(frames, source_fps)``, an iterator over its frames and its frame rate.

    Args:
        path: the video file.
        fps: keep about this many frames per second (default: every frame). Frames are
            taken at the source's timestamps nearest to multiples of ``1 / fps``.
        max_frames: stop after this many frames (default: all).
        size: resize every frame to ``size x size`` pixels (``cv2.INTER_AREA``; default: keep).

    Returns:
        ``(iterator, source_fps)``: the iterator yields uint8 ``(height, width, 3)`` RGB frames, one
        decoded at a time, and raises ``VideoError`` at its end when it yielded none;
        ``source_fps`` is the container's frame rate, or ``None`` when it states none.

    Raises:
        VideoError: the file is missing or cannot be opened.
    """
    import cv2

    path = Path(path)
    if not path.is_file():
        raise VideoError(f"Video file {path} does not exist.")
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise VideoError(f"{path} cannot be opened as a video (unknown format or corrupt).")
    source_fps = capture.get(cv2.CAP_PROP_FPS) or None
    step = source_fps / fps if fps and source_fps else 1.0

    def frames():
        kept, index, next_kept = 0, 0, 0.0
        try:
            while max_frames is None or kept < max_frames:
                ok, frame = capture.read()
                if not ok:
                    break
                if index >= next_kept - 1e-6:
                    frame = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
                    if size:
                        frame = cv2.resize(frame, (size, size), interpolation=cv2.INTER_AREA)
                    kept += 1
                    next_kept += step
                    yield frame
                index += 1
        finally:
            capture.release()
        if not kept:
            raise VideoError(f"{path} holds no decodable frame.")

    return frames(), source_fps


def read_video(path, fps=None, max_frames=None, size=None):
    """A video's frames, all in memory: uint8 ``(frames, height, width, 3)`` RGB (``video_frames``'
    arguments and errors)."""
    return np.stack(list(video_frames(path, fps, max_frames, size)[0]))
