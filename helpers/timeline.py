"""LRCN predictions over time: a long video, frame folder or feature clip read as a stream and
classified in sliding windows.

Each frame goes once through the model's per-frame part (``frame_backbone``: VGG16; nothing for a
head-only model on feature clips), in chunks, and only the last window's frame features are held,
so a video longer than memory is read frame by frame (OpenCV) and never whole. Each window's
features go through the model's ``lrcn_head``, sampled to the model's frame count when it has
one (``sequences.sample_indices``, as a clip is), with every frame real (no padding): the same
probabilities as the whole model on that window's frames.

Windows and strides are in seconds where the input has a frame rate (a video), else in frames.
Windows start at 0, ``stride``, ``2 * stride``, ...; a last window ends at the last frame, so the
timeline covers the whole input (an input shorter than one window is one window).
"""

import collections
import os
from pathlib import Path

import numpy as np

from helpers import data, sequences, video
from helpers.errors import UsageError

CHUNK = 16  # frames per pass through the per-frame backbone


def frame_source(item, image_size, max_frames=None):
    """``(frames, frames_per_second)``: an iterator over an input's frames, and its frame rate
    (``None`` where it has none: a frame folder, a ``.npy`` clip, an array).

    Args:
        item: a video file (read with OpenCV, one frame at a time), a frame folder (naturally
            sorted), a ``.npy`` feature clip ``(frames, features)`` (memory-mapped), or an array
            (``(frames, height, width, 3)`` RGB 0..255 or ``(frames, features)``).
        image_size: frames are resized to ``image_size x image_size`` (``None``: feature clips).
        max_frames: stop after this many frames (default: all).

    Yields (through the iterator) float32 ``(image_size, image_size, 3)`` RGB 0..255 frames, or
    ``(features,)`` rows.

    Raises:
        helpers.video.VideoError: a video that is missing or cannot be opened.
        helpers.data.DatasetError: an empty frame folder, an unreadable ``.npy`` file.
    """
    def limited(frames):
        for index, frame in enumerate(frames):
            if max_frames is not None and index >= max_frames:
                return
            yield frame

    if isinstance(item, (str, os.PathLike)):
        path = Path(item)
        if path.is_dir():
            paths = sequences.frame_files(path)
            if not paths:
                raise data.DatasetError(f"{path} holds no frames.")
            return limited(data.rgb_array(p, image_size) for p in paths), None
        if path.suffix.lower() == sequences.CLIP_EXTENSION:
            try:
                clip = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as error:
                raise data.DatasetError(f"{path} cannot be read as a .npy clip ({error}).") from error
            return limited(np.asarray(row, np.float32) for row in clip), None
        frames, fps = video.video_frames(path, max_frames=max_frames, size=image_size)
        return (frame.astype(np.float32) for frame in frames), fps
    array = np.asarray(item)
    if array.ndim == 2:
        return limited(np.asarray(row, np.float32) for row in array), None
    return limited(data.rgb_array(frame, image_size) for frame in array), None


def sliding_windows(rows, window, stride):
    """Windows of ``window`` consecutive rows every ``stride`` rows, the last ending at the last row.

    Args:
        rows: an iterable of equal-shape arrays (per-frame features); read once, in order.
        window, stride: in rows, at least 1.

    Yields:
        ``(start, end, array)``: rows ``start`` (inclusive) to ``end`` (exclusive) stacked,
        ``(end - start, *row_shape)``. Only the last ``window`` rows are held.
    """
    recent = collections.deque(maxlen=window)
    next_start, last_end, count = 0, 0, 0
    for row in rows:
        recent.append(row)
        count += 1
        if count == next_start + window:
            yield next_start, count, np.stack(recent)
            last_end, next_start = count, next_start + stride
    if count and last_end < count:  # the tail (or an input shorter than one window)
        yield count - len(recent), count, np.stack(recent)


def _per_frame(frames, backbone):
    """``frames`` through ``backbone`` (a per-frame ``keras.Model``, or ``None``: as they are), ``CHUNK``
    at a time, yielded one row at a time."""
    if backbone is None:
        yield from frames
        return
    chunk = []
    for frame in frames:
        chunk.append(frame)
        if len(chunk) == CHUNK:
            yield from np.asarray(backbone.predict_on_batch(np.stack(chunk)))
            chunk = []
    if chunk:
        yield from np.asarray(backbone.predict_on_batch(np.stack(chunk)))


def check_window(window, stride=None):
    """``(window, stride)`` with the stride's default (half the window).

    Raises:
        UsageError: either is not a positive finite number (named as its flag).
    """
    stride = window / 2 if stride is None else stride
    for name, value in (("window", window), ("stride", stride)):
        if not value > 0 or value == float("inf"):
            raise UsageError(f"--{name} must be a positive number. Received: {value}")
    return window, stride


def windows_in_frames(window, stride, fps):
    """``(window, stride)`` in frames from the user's units (seconds with a frame rate ``fps``,
    else frames; ``stride`` ``None``: half the window).

    Raises:
        UsageError: a window or stride that is not positive, or under one frame.
    """
    window, stride = check_window(window, stride)
    scale = fps or 1.0
    in_frames = [int(round(value * scale)) for value in (window, stride)]
    if min(in_frames) < 1:
        raise UsageError(f"--window {window} and --stride {stride} must each span at least one frame"
                         f"{f' ({fps:g} frames per second)' if fps else ''}.")
    return tuple(in_frames)


def predict_over_time(model, item, window, stride=None, max_frames=None):
    """Class probabilities of an input's sliding windows.

    Args:
        model: a loaded LRCN (``lrcn.build_lrcn``): with VGG16 (frames in) or head-only (feature
            clips in).
        item: as for ``frame_source``.
        window, stride: in seconds for a video, frames otherwise (``windows_in_frames``).
        max_frames: frames read at most (default: all).

    Returns:
        ``(rows, unit)``: per window ``(start, end, probabilities)`` with ``start``/``end`` in the
        unit (``"s"`` or ``"frames"``) and float64 ``(num_classes,)`` probabilities (a per-frame
        model's averaged over the window's frames).
    """
    from helpers import training

    head = training.find_layer(model, "lrcn_head")
    width = sequences.feature_width(model)
    backbone = None if width else training.find_layer(model, "frame_backbone")
    frames = model.input_shape[1]
    frames_in, fps = frame_source(item, None if width else model.input_shape[2], max_frames)
    window_frames, stride_frames = windows_in_frames(window, stride, fps)
    scale = fps or 1.0
    rows = []
    for start, end, features in sliding_windows(_per_frame(frames_in, backbone), window_frames, stride_frames):
        if frames:
            features = features[sequences.sample_indices(len(features), frames)]
        if width and features.shape[-1] != width:
            raise UsageError(f"{item} has {features.shape[-1]} features per frame; this model reads {width}.")
        scores = np.asarray(head.predict_on_batch([features[None], np.ones((1, len(features)), bool)]))[0]
        scores = scores.mean(axis=0) if scores.ndim == 2 else scores
        rows.append((start / scale, end / scale, scores.astype(np.float64)))
    return rows, ("s" if fps else "frames")


def write_timeline(rows, unit, class_names, top_k, folder, name):
    """Writes ``folder/<name>.csv`` (columns ``start``, ``end``, then ``class_1``,
    ``probability_1``, ... ``class_k``, ``probability_k`` per window) and ``folder/<name>.png``
    (``helpers.reports.plot_timeline``), each written aside and renamed into place.

    Returns:
        ``(csv_path, png_path)``.
    """
    import csv
    import io

    from helpers import reports, rundir

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    k = min(top_k, len(class_names))
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["start", "end", *[f"{column}_{rank}" for rank in range(1, k + 1)
                                       for column in ("class", "probability")]])
    for start, end, scores in rows:
        ranked = reports.top_k(scores, class_names, k)
        writer.writerow([f"{start:.3f}", f"{end:.3f}", *[v for label, p in ranked for v in (label, f"{p:.6f}")]])
    csv_path, png_path = folder / f"{name}.csv", folder / f"{name}.png"
    rundir.write_text(csv_path, text.getvalue())
    reports.plot_timeline(rows, unit, class_names, png_path, title=name)
    return csv_path, png_path
