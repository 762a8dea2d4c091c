"""Frame-sequence datasets for LRCN: listing, frame sampling, batching.

A sample is a folder of frames; its frames are ordered by the natural sort of their
names (``frame_2`` before ``frame_10``). Two layouts are read (seeds ``002``/``003``):

- the seed's: ``<split>/<label>_<anything>/<frames>``, the label a 1-based number;
- class folders: ``<split>/<class>/<sample>/<frames>``.

Or a sample is a **feature clip**: a ``.npy`` file ``(frames, features)`` of per-frame
features computed elsewhere (``<split>/<class>/<clip>.npy``; the way large video datasets
ship, and what ``helpers.ucf101_features`` writes). A dataset is one or the other.

Batches stream from disk through a ``keras.utils.PyDataset`` with worker threads, so
memory does not grow with the dataset: ``(batch, frames, size, size, 3)`` float32 RGB
in 0..255 (the model applies VGG16's preprocessing itself), or ``(batch, frames,
features)`` float32 for feature clips, and one-hot labels.
"""

import dataclasses
import hashlib
import re
from pathlib import Path

import keras
import numpy as np
from helpers.data import DatasetError, check_duplicates, image_digests, is_utf8_name, read_rgb
from helpers.errors import UsageError
from helpers.formats import IMAGE_EXTENSIONS
from helpers.layers import PAD_VALUE

SEED_LAYOUT = re.compile(r"^(\d+)_")
CLIP_EXTENSION = ".npy"  # a feature clip: (frames, features)


def natural_key(name):
    """Sort key that orders digit runs by value: ``frame_2`` < ``frame_10``."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", str(name))]


def frame_files(folder):
    """The image files directly in ``folder``, naturally sorted."""
    return sorted((p for p in Path(folder).iterdir() if p.is_file() and p.name.lower().endswith(IMAGE_EXTENSIONS)),
                  key=lambda p: natural_key(p.name))


def sample_indices(length, frames):
    """Indices of ``frames`` frames spread evenly over a sequence of ``length``.

    The first and last frames are always taken and the gaps differ by at most one
    (``round(linspace(0, length - 1, frames))``). A sequence shorter than ``frames``
    has its frames repeated evenly in order, each held about ``frames / length``
    steps, like a slowed-down clip; the order of events is kept. (The seed stepped
    back from the last frame and repeated the first frame for short sequences.)

    Returns:
        int array ``(frames,)``, non-decreasing, in ``[0, length)``.

    Raises:
        ValueError: ``length < 1`` or ``frames < 1``.
    """
    if length < 1 or frames < 1:
        raise ValueError(f"Need length >= 1 and frames >= 1. Received: length={length}, frames={frames}")
    return np.round(np.linspace(0, length - 1, frames)).astype(np.int64)


@dataclasses.dataclass
class SequenceSplit:
    """One split of a frame-sequence dataset.

    Attributes:
        directory: the split folder.
        class_names: names in index order (the seed layout's labels as ``"1"``, ``"2"``, ...).
        samples: one list of naturally sorted frame paths per sample.
        labels: class index per sample.
        layout: ``"seed"`` or ``"class_folders"``.
        features: for feature clips, the features per frame (every clip's width); ``None``
            for frame folders. A feature clip's sample is the ``.npy`` path itself.
    """

    directory: Path
    class_names: list
    samples: list
    labels: list
    layout: str
    features: int = None

    def __len__(self):
        return len(self.samples)


def _folders(directory):
    """The sub-folders of ``directory`` but hidden ones (``.name``: an extraction's partial
    folder, ``.ipynb_checkpoints``), which are never samples or classes."""
    return [p for p in Path(directory).iterdir() if p.is_dir() and not p.name.startswith(".")]


def list_sequences(directory, class_names=None):
    """Lists the samples of a split in either layout.

    Args:
        directory: the split folder.
        class_names: expected classes (from train), or ``None`` to take them from here.

    Raises:
        DatasetError: a missing or empty folder, a sample folder without frames, a seed
            layout name without a number, a class not in ``class_names``, a ``.npy`` clip that
            is not ``(frames, features)`` of real numbers. Every problem is named. Frame folders
            and ``.npy`` clips mixed, or clips of different widths: one line naming two of them.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise DatasetError(f"Split folder {directory} does not exist.")
    folders = sorted(_folders(directory), key=lambda p: natural_key(p.name))
    if not folders:
        raise DatasetError(f"{directory} has no sample or class folders.")
    seed_layout = any(frame_files(f) for f in folders) or all(SEED_LAYOUT.match(f.name) for f in folders)
    problems, entries = [], []  # (class name, sample folder)
    if seed_layout:
        for folder in folders:
            match = SEED_LAYOUT.match(folder.name)
            if not match or int(match.group(1)) < 1:
                problems.append(f"{folder}: a sample folder must be named <label>_<anything>, label from 1")
            else:
                entries.append((str(int(match.group(1))), folder))
    else:
        for class_folder in folders:
            if not is_utf8_name(class_folder.name):
                problems.append(f"{ascii(str(class_folder))}: a class folder name must be valid UTF-8 (it becomes "
                                "the class name); rename it")
                continue
            samples = sorted(_folders(class_folder), key=lambda p: natural_key(p.name))
            samples += sorted(_clip_files(class_folder), key=lambda p: natural_key(p.name))
            if not samples:
                problems.append(f"{class_folder}: no sample folders or {CLIP_EXTENSION} clips")
            entries += [(class_folder.name, sample) for sample in samples]
    _check_one_kind([sample for _, sample in entries])
    if class_names is None:
        class_names = sorted({name for name, _ in entries}, key=natural_key)
    samples, labels, width = [], [], None
    for name, folder in entries:
        if folder.is_file():  # a feature clip
            shape, problem = _clip_shape(folder)
            if problem:
                problems.append(problem)
            elif name not in class_names:
                problems.append(f"{folder}: class {name!r} is not one of the training classes {class_names}")
            elif width is not None and shape[1] != width[0]:
                raise DatasetError(f"Feature clips of different widths: {width[1]} has {width[0]} features per "
                                   f"frame, {folder} {shape[1]}; every clip needs the same.")
            else:
                width = width or (shape[1], folder)
                samples.append(folder)
                labels.append(class_names.index(name))
            continue
        frames = frame_files(folder)
        if not frames:
            problems.append(f"{folder}: no frames ({', '.join(IMAGE_EXTENSIONS)})")
        elif name not in class_names:
            problems.append(f"{folder}: class {name!r} is not one of the training classes {class_names}")
        else:
            samples.append(frames)
            labels.append(class_names.index(name))
    if problems:
        shown = "\n  ".join(problems[:20])
        raise DatasetError(f"The frame sequences in {directory} cannot be used:\n  {shown}")
    return SequenceSplit(directory, list(class_names), samples, labels, "seed" if seed_layout else "class_folders",
                         features=width[0] if width else None)


def _clip_files(folder):
    """The ``.npy`` feature clips directly in ``folder`` but hidden ones (a partial write)."""
    return [p for p in Path(folder).iterdir()
            if p.is_file() and p.suffix.lower() == CLIP_EXTENSION and not p.name.startswith(".")]


def _check_one_kind(samples):
    """Raises ``DatasetError`` naming a frame folder and a ``.npy`` clip when ``samples`` holds both."""
    folder = next((s for s in samples if s.is_dir()), None)
    clip = next((s for s in samples if s.is_file()), None)
    if folder is not None and clip is not None:
        raise DatasetError(f"Frame folders and {CLIP_EXTENSION} feature clips are mixed ({folder} and {clip}): a "
                           "dataset is one or the other.")


def _clip_shape(path):
    """``(shape, None)`` of a ``.npy`` feature clip, read from its header, or ``(None, problem)``."""
    try:
        clip = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        return None, f"{path}: not a readable .npy array ({str(error).splitlines()[0] if str(error) else error!r})"
    if not isinstance(clip, np.ndarray) or clip.ndim != 2 or min(clip.shape) < 1 or clip.dtype.kind not in "fiu":
        return None, (f"{path}: a feature clip must be a non-empty (frames, features) array of real numbers. "
                      f"Received: shape {getattr(clip, 'shape', None)}, dtype {getattr(clip, 'dtype', None)}")
    return clip.shape, None


def check_same_kind(splits):
    """Raises ``DatasetError`` naming a sample of each when the ``SequenceSplit``s mix frame
    folders and feature clips, or feature clips of different widths."""
    first = splits[0]
    for split in splits[1:]:
        if split.features != first.features:
            def what(s):
                return f"{s.samples[0]} ({f'{s.features} features per frame' if s.features else 'frames'})"

            raise DatasetError(f"{what(first)} and {what(split)} are not the same kind of clip: every split needs "
                               "the same.")


def is_feature_clip(sample):
    """Whether a sample of a ``SequenceSplit`` is a feature clip (its ``.npy`` path), not a frame folder
    (its list of frame paths)."""
    return isinstance(sample, Path)


def feature_width(model):
    """The features per frame an LRCN on feature clips reads (its input ``(batch, frames, width)``), or
    ``None`` for one on frames (``(batch, frames, size, size, 3)``)."""
    return model.input_shape[-1] if len(model.input_shape) == 3 else None


def sequence_length(sample):
    """Frames in a sample: a frame folder's files, or a feature clip's rows (from its header)."""
    return np.load(sample, mmap_mode="r").shape[0] if is_feature_clip(sample) else len(sample)


def load_clip(sample, frames=None, image_size=None):
    """A sample's frames, ``frames`` of them spread evenly (``sample_indices``) or all (``None``).

    Returns:
        float32 ``(frames, image_size, image_size, 3)`` RGB 0..255 for a frame folder (its list
        of paths), ``(frames, features)`` for a feature clip (its ``.npy`` path).
    """
    if is_feature_clip(sample):
        clip = np.load(sample, mmap_mode="r")
        return np.asarray(clip[sample_indices(len(clip), frames)] if frames else clip, np.float32)
    return load_frames(sampled_paths(sample, frames), image_size)


def load_frames(paths, image_size):
    """Decodes frames to ``(len(paths), image_size, image_size, 3)`` float32 RGB in 0..255 (bilinear resize)."""
    out = np.empty((len(paths), image_size, image_size, 3), np.float32)
    for i, path in enumerate(paths):
        out[i] = read_rgb(path, image_size)
    return out


def one_hot(labels, num_classes, frames=None):
    """One-hot float32 labels ``(samples, num_classes)``, or ``(samples, frames, num_classes)``
    repeated over the frames for per-frame training."""
    y = np.eye(num_classes, dtype=np.float32)[list(labels)]
    return y if frames is None else np.repeat(y[:, None], frames, axis=1)


def sampled_paths(paths, frames):
    """The frame files a sample is read from: ``frames`` of them spread evenly
    (``sample_indices``), or all of them for ``frames=None``."""
    if frames:
        return [paths[i] for i in sample_indices(len(paths), frames)]
    return list(paths)


class FrameSequences(keras.utils.PyDataset):
    """Batches of frame sequences, read from disk by worker threads.

    Three ways to batch, matching the seed's two loading modes plus padding:

    - ``frames=N``: every sample sampled to N frames (``sample_indices``); any batch size.
    - ``frames=None, batch_size=1``: each sample at its own length, one per batch (the seed).
    - ``frames=None, batch_size>1``: samples bucketed by length (sorted, then cut into
      batches, so a batch's lengths are close), padded at the end to the batch's
      longest with ``PAD_VALUE``; the model masks the padding.

    With ``frames=None`` a batch's length is rounded up to a multiple of ``length_multiple``
    frames (more ``PAD_VALUE`` frames, masked, so the loss and predictions are unchanged): on
    JAX every new input shape compiles the train step anew, and a few lengths keep that to a
    few compiles (1: the longest clip's length, no rounding).

    Yields ``(x, y)``: x ``(batch, frames, image_size, image_size, 3)`` float32 RGB 0..255
    (padding ``PAD_VALUE``); y ``(batch, num_classes)`` one-hot float32, or with
    ``per_frame`` ``(batch, frames, num_classes)``.

    With ``augment`` each clip gets a random crop and flip, the same for all its frames
    (``augment_clip``), drawn anew every epoch from ``(seed, epoch, sample)``.
    """

    def __init__(self, split, image_size, batch_size, frames=None, shuffle=False, seed=0, per_frame=False,
                 workers=2, augment=False, length_multiple=1, **kwargs):
        super().__init__(workers=workers, use_multiprocessing=False, **kwargs)
        if length_multiple < 1:
            raise UsageError(f"length_multiple must be at least 1. Received: length_multiple={length_multiple}")
        self.length_multiple = length_multiple
        self.split, self.image_size, self.frames = split, image_size, frames
        self.batch_size, self.shuffle, self.per_frame = batch_size, shuffle, per_frame
        self.seed, self.augment, self.epoch = seed, augment, 0
        self.rng = np.random.default_rng(seed)
        self.num_classes = len(split.class_names)
        self._make_batches()

    def _make_batches(self):
        order = np.arange(len(self.split))
        if self.shuffle:
            self.rng.shuffle(order)
        if self.frames is None and self.batch_size > 1:  # bucketing: close lengths share a batch
            order = sorted(order, key=lambda index: sequence_length(self.split.samples[index]))
        self.batches = [list(order[i:i + self.batch_size]) for i in range(0, len(order), self.batch_size)]
        if self.shuffle:
            self.rng.shuffle(self.batches)

    def __len__(self):
        return len(self.batches)

    def on_epoch_end(self):
        self.epoch += 1
        self._make_batches()

    def load_clip(self, index):
        """Sample ``index``'s (sampled) frames or features (``load_clip``)."""
        return load_clip(self.split.samples[index], self.frames, self.image_size)

    @property
    def row_count(self):
        """Samples listed (``helpers.distribute.ProcessSlices``)."""
        return len(self.split)

    def __getitem__(self, batch_index):
        return self.load_rows(self.batches[batch_index])

    def load_rows(self, indices):
        """The batch of samples ``indices`` (padded and labelled as ``__getitem__``'s)."""
        clips = [self.load_clip(i) for i in indices]
        if self.augment:  # a generator per clip: worker threads share no random state
            clips = [augment_clip(clip, np.random.default_rng([self.seed, self.epoch, int(i)]))
                     for clip, i in zip(clips, indices)]
        length = max(len(c) for c in clips)
        if self.frames is None:
            length = -(-length // self.length_multiple) * self.length_multiple
        x = np.full((len(clips), length, *clips[0].shape[1:]), PAD_VALUE, np.float32)
        for row, clip in enumerate(clips):
            x[row, :len(clip)] = clip
        y = one_hot([self.split.labels[i] for i in indices], self.num_classes, length if self.per_frame else None)
        return x, y

    @property
    def labels(self):
        """Class index of every sample, in batch order (for evaluation without shuffling)."""
        return [self.split.labels[i] for batch in self.batches for i in batch]


def augment_clip(clip, rng, min_scale=0.8):
    """A random square crop of ``min_scale``..1 of the side, resized back, and a horizontal
    flip with probability 1/2: the same crop and flip for every frame, so motion between
    frames is kept (per-clip consistent augmentation, as for action recognition).

    Args:
        clip: ``(frames, size, size, 3)`` float32 RGB 0..255.
        rng: a ``numpy.random.Generator``.

    Returns:
        The augmented clip, same shape and dtype, values in the input's range.
    """
    size = clip.shape[1]
    side = int(round(size * rng.uniform(min_scale, 1.0)))
    top, left = (int(v) for v in rng.integers(0, size - side + 1, size=2))
    out = clip[:, top:top + side, left:left + side]
    if side != size:
        out = keras.ops.convert_to_numpy(keras.ops.image.resize(out, (size, size), interpolation="bilinear"))
    if rng.random() < 0.5:
        out = out[:, :, ::-1]
    return np.ascontiguousarray(out, dtype=np.float32)


def check_sequences(split, skip_check=False):
    """Decodes every frame once, or reads every feature clip whole; raises ``DatasetError``
    naming each unreadable frame, or each clip that cannot be read or holds NaN or infinite values.

    Returns:
        ``{sample key: digest}`` per clip (``sample_key``): for frames, the BLAKE2b of its frames'
        pixel digests in order (``helpers.data.check_images``); for feature clips, of the array's
        dtype, shape and bytes. With ``skip_check`` nothing is decoded or checked: the digests
        are of the files' bytes.
    """
    digests = {}
    if not split.features:
        paths = [p for sample in split.samples for p in sample]
        frames = image_digests(paths, skip_check)
        for sample in split.samples:
            digest = hashlib.blake2b(digest_size=16)
            for path in sample:
                digest.update(frames[path].encode())
            digests[sample_key(sample)] = digest.hexdigest()
        return digests
    problems = []
    for path in split.samples:
        try:
            clip = np.load(path, allow_pickle=False)
            if not skip_check and not np.isfinite(clip).all():
                problems.append(f"{path}: NaN or infinite values")
            digest = hashlib.blake2b(f"{clip.dtype}{clip.shape}".encode(), digest_size=16)
            digest.update(np.ascontiguousarray(clip).tobytes())
            digests[path] = digest.hexdigest()
        except (OSError, ValueError, EOFError) as error:
            problems.append(f"{path}: cannot be read ({error})")
    if problems:
        raise DatasetError(f"{len(problems)} feature clips cannot be used:\n  " + "\n  ".join(problems[:20]))
    return digests


def sample_key(sample):
    """What names a clip: its frame folder, or its ``.npy`` file."""
    return sample if is_feature_clip(sample) else Path(sample[0]).parent


def check_splits(splits, skip_check=False, allow_duplicates=False):
    """The check before training: every clip read once (``check_sequences``), then the same clip in
    two splits refused and repeats inside a split warned about (``helpers.data.check_duplicates``),
    whatever the clips' names. Clips are compared whole (a black frame that opens many videos is
    not a repeat).

    Args:
        splits: ``{split name: SequenceSplit}``.

    Raises:
        DatasetError: as ``check_sequences`` and ``check_duplicates``.
    """
    digests, groups = {}, []
    for name, split in splits.items():
        found = check_sequences(split, skip_check)
        digests.update(found)
        groups.append((name, list(found)))
    check_duplicates(groups, digests, allow=allow_duplicates, what="clip")

