"""Class-folder image datasets: listing, checking, class names.

The layout is the one ``helpers/restructure_dataset.py`` writes and Keras'
``flow_from_directory`` reads::

    DATA/train/<class>/*.JPEG
    DATA/val/<class>/*.JPEG
    DATA/test/<class>/*.JPEG     optional labelled holdout
    DATA/words.txt               optional: <class><TAB>human-readable names

Images are listed exactly as ``flow_from_directory`` lists them (class folders in
sorted order, files found recursively, sorted, by extension), so the class indices
here are the generator's.

Bad input stops the run before training with a ``DatasetError`` that names every
bad folder or file: a missing or empty data directory, a class folder without
images, a class missing from a split, and images that cannot be decoded (truncated,
corrupt, or not an image under an image extension). We stop rather than skip,
so a figure is never silently measured on fewer images than the folder holds.
Files without an image extension are ignored by Keras too; they are counted and
reported in the log.
"""

import concurrent.futures
import dataclasses
import hashlib
import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from helpers.errors import UsageError
from helpers.formats import IMAGE_EXTENSIONS, file_digest, read_text

logger = logging.getLogger(__name__)

MAX_LISTED = 20  # problems listed in an error message before "... and N more"


class DatasetError(UsageError):
    """The data directory is missing, empty or holds unreadable images."""


@dataclasses.dataclass
class Split:
    """One split of a class-folder dataset.

    Attributes:
        name: ``"train"``, ``"val"`` or ``"test"``.
        directory: the split's folder.
        class_names: class folder names in index order (sorted), length ``num_classes``.
        paths: image paths, class by class, in ``flow_from_directory`` order.
        labels: class index of each path, ints in ``[0, num_classes)``.
        skipped: files ignored because their extension is not an image's.
    """

    name: str
    directory: Path
    class_names: list
    paths: list
    labels: list
    skipped: int = 0

    def __len__(self):
        return len(self.paths)


def _raise(problems, header):
    shown = "\n  ".join(problems[:MAX_LISTED])
    more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    raise DatasetError(f"{header}\n  {shown}{more}")


def _images_in(folder):
    """Image files under ``folder`` (recursive, sorted like Keras) and the skipped count."""
    images, skipped = [], 0
    for root, _, files in sorted(os.walk(folder), key=lambda item: item[0]):
        for name in sorted(files):
            if name.lower().endswith(IMAGE_EXTENSIONS):
                images.append(Path(root) / name)
            else:
                skipped += 1
    return images, skipped


def list_split(directory, class_names=None, name=None):
    """Lists and checks one split folder.

    Args:
        directory: the split folder, holding one sub-folder per class.
        class_names: the expected classes (from train); ``None`` takes the
            sorted sub-folders of ``directory``.
        name: the split's name for messages (default: the folder's name).

    Returns:
        A ``Split``.

    Raises:
        DatasetError: the folder is missing, has no class folders, a class folder
            holds no image, or an expected class folder is missing. The message
            names every such folder.
    """
    directory = Path(directory)
    name = name or directory.name
    if not directory.is_dir():
        raise DatasetError(f"The {name} split folder {directory} does not exist.")
    found = sorted(entry.name for entry in os.scandir(directory) if entry.is_dir())
    not_utf8 = [ascii(str(directory / c)) for c in found if not is_utf8_name(c)]
    if not_utf8:
        _raise(not_utf8, f"Class folder names in {ascii(str(directory))} must be valid UTF-8 (they become the "
                         "class names); rename these:")
    if class_names is None:
        if not found:
            raise DatasetError(
                f"{directory} has no class folders: expected {directory}/<class>/<image files>."
            )
        class_names = found
    problems = [f"{directory / c}: class folder missing (train has it)" for c in class_names if c not in found]
    problems += [f"{directory / c}: class folder not in train" for c in found if c not in class_names]
    paths, labels, skipped = [], [], 0
    for index, class_name in enumerate(class_names):
        if class_name not in found:
            continue
        images, ignored = _images_in(directory / class_name)
        skipped += ignored
        if not images:
            problems.append(f"{directory / class_name}: no images ({', '.join(IMAGE_EXTENSIONS)})")
        paths += images
        labels += [index] * len(images)
    if problems:
        _raise(problems, f"The {name} split in {directory} cannot be used:")
    if skipped:
        logger.warning("%s: ignored %d files without an image extension", directory, skipped)
    return Split(name, directory, list(class_names), paths, labels, skipped)


def is_utf8_name(name):
    """False for a file name whose bytes are not UTF-8 (Python holds them as surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# PIL modes of 16- and 32-bit grayscale: the generator path (PIL -> RGB) would clip them to 255.
WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def _decode_problem(path):
    """``(problem or None, digest or None)``: the full decode ``check_images`` runs on one file, and the
    BLAKE2b of its decoded pixels (size and RGB bytes), the same for the same photo whatever its name
    or format."""
    try:
        rgb = open_rgb(path)  # full decode, as training reads it: catches truncated files, unlike verify()
    except DatasetError as error:
        return str(error), None
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, ...
        return f"{ascii(str(path))}: {type(error).__name__}: {error}", None
    digest = hashlib.blake2b(f"{rgb.size}".encode(), digest_size=16)
    digest.update(rgb.tobytes())
    return None, digest.hexdigest()


def file_digests(paths, workers=None):
    """``{path: BLAKE2b of its bytes}``: ``check_duplicates``' digests when the images are not decoded
    (``--skip-image-check``): byte-identical copies only."""
    with concurrent.futures.ThreadPoolExecutor(workers or os.cpu_count()) as pool:
        return dict(zip(paths, pool.map(file_digest, paths, chunksize=256)))


def check_duplicates(groups, digests, allow=False, what="image"):
    """Finds the same image (or clip) twice, by ``digests``, whatever its file name, folder or format.

    Args:
        groups: ``[(split name, items), ...]``, items being keys of ``digests`` (paths).
        digests: ``{item: digest}``: ``check_images``' pixel digests, or ``file_digests``.
        allow: warn about repeats across splits instead of refusing them (``--allow-duplicates``).
        what: the item's name in the messages (``"image"``, ``"clip"``).

    Returns:
        ``(across, within)``: pairs ``(first item, its split, repeat, its split)``.

    Raises:
        DatasetError: one line naming both files of the first pair found in two splits (a test
            figure on it would measure memory), with the count of such pairs; unless ``allow``.
    """
    first, across, within = {}, [], []
    order = {"train": 0, "val": 1, "test": 2}  # the copy in the later split is the one named second
    for split, items in sorted(groups, key=lambda group: order.get(group[0], len(order))):
        for item in items:
            digest = digests.get(item)
            if digest is None:
                continue
            if digest in first:
                seen_item, seen_split = first[digest]
                (within if seen_split == split else across).append((seen_item, seen_split, item, split))
            else:
                first[digest] = (item, split)
    if across and not allow:
        a, a_split, b, b_split = across[0]
        more = f" ({len(across)} such pairs)" if len(across) > 1 else ""
        raise DatasetError(f"the same {what} is in two splits: {a} ({a_split}) and {b} ({b_split}){more}; a score "
                           f"on it would measure memory. Remove one, or pass --allow-duplicates for data known to "
                           "repeat.")
    for pairs, where in ((within, "inside one split"), (across, "in two splits (--allow-duplicates)")):
        if pairs:
            shown = "; ".join(f"{a} and {b} ({b_split})" for a, _, b, b_split in pairs[:3])
            logger.warning("%d %s%s repeated %s: %s%s", len(pairs), what, "s" if len(pairs) > 1 else "", where,
                           shown, "; ..." if len(pairs) > 3 else "")
    return across, within


def evaluation_split(splits, data_dir, how_to_add="python -m helpers.restructure_dataset --holdout N carves a "
                                                "test/ split of class folders from train"):
    """The split a finished training run is scored on: ``"test"`` when ``splits`` has one, else
    ``"val"``, with a warning that val also chose the checkpoint, so its figure is optimistic.

    Args:
        splits: a mapping from split names (``"train"``, ``"val"``, maybe ``"test"``) to splits.
        data_dir: the data folder, named in the warning.
        how_to_add: the warning's advice on adding a test split to this kind of data.
    """
    if "test" in splits:
        return "test"
    logger.warning("no labelled test split in %s: evaluating on val, which also chose the checkpoint, so the "
                   "figure is optimistic (%s)", data_dir, how_to_add)
    return "val"


def check_images(paths, workers=None):
    """Decodes every image once with PIL (what the Keras generator uses).

    Runs in a thread pool (PIL releases the GIL while decoding).

    Args:
        paths: image file paths.
        workers: threads (default: the number of CPU cores).

    Returns:
        ``{path: digest}``: the BLAKE2b of each image's decoded pixels (``check_duplicates``).

    Raises:
        DatasetError: naming every file that cannot be decoded, and every 16- or 32-bit
            image (PIL's modes I;16, I, F), which Keras' generator would clip to white.
    """
    with concurrent.futures.ThreadPoolExecutor(workers or os.cpu_count()) as pool:
        results = list(pool.map(_decode_problem, paths, chunksize=256))
    problems = [problem for problem, _ in results if problem]
    if problems:
        _raise(
            problems,
            f"{len(problems)} of {len(paths)} images cannot be decoded; remove or replace them "
            "and run again:",
        )
    return {path: digest for path, (_, digest) in zip(paths, results)}


def check_splits(groups, skip_check=False, allow_duplicates=False):
    """The check every training run makes before it trains: each image decoded once (``check_images``;
    with ``skip_check`` only the files' bytes are read), then the same image in two splits refused and
    repeats inside a split warned about (``check_duplicates``).

    Args:
        groups: ``[(split name, image paths), ...]``.
        skip_check: ``--skip-image-check``.
        allow_duplicates: ``--allow-duplicates``.

    Raises:
        DatasetError: as ``check_images`` and ``check_duplicates``.
    """
    check_duplicates(groups, image_digests([path for _, items in groups for path in items], skip_check),
                     allow=allow_duplicates)


def image_digests(paths, skip_check=False):
    """``{path: digest}``: ``check_images``' (every image decoded and checked, its pixels hashed), or
    with ``skip_check`` (``--skip-image-check``) ``file_digests``' (only the bytes read and hashed)."""
    return file_digests(paths) if skip_check else check_images(paths)


def load_splits(data_dir, splits=("train", "val"), optional=("test",)):
    """Lists the splits of a data directory and checks them against train's classes
    (``check_images`` decodes the images).

    Args:
        data_dir: the dataset root.
        splits: required split folders; the first defines the classes.
        optional: split folders used when present.

    Returns:
        A dict ``{split name: Split}`` of the splits found.

    Raises:
        DatasetError: the root is missing or empty, or a split is unusable.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DatasetError(f"Data directory {data_dir} does not exist.")
    if not any(data_dir.iterdir()):
        raise DatasetError(f"Data directory {data_dir} is empty: expected {', '.join(splits)} folders.")
    result, class_names, problems = {}, None, []
    for name in list(splits) + [s for s in optional if (data_dir / s).is_dir()]:
        try:
            result[name] = list_split(data_dir / name, class_names, name)
        except DatasetError as error:  # report every split's problems at once
            problems.append(str(error))
            if class_names is None and (data_dir / name).is_dir():  # check later splits against its folders
                class_names = sorted(e.name for e in os.scandir(data_dir / name) if e.is_dir()) or None
            continue
        class_names = result[name].class_names
    if problems:
        raise DatasetError("\n".join(problems))
    return result


def read_words(path):
    """Reads Tiny ImageNet's ``words.txt`` (``wnid<TAB>names``) into a dict; ``{}`` if absent.

    Raises:
        helpers.errors.UsageError: the file is not UTF-8 text (named).
    """
    path = Path(path)
    if not path.is_file():
        return {}
    words = {}
    for line in read_text(path).splitlines():
        key, _, names = line.partition("\t")
        if key.strip():
            words[key.strip()] = names.strip()
    return words


def image_files(inputs):
    """Expands image files and folders (searched recursively) into image paths; the files of a
    folder that are not of ``IMAGE_EXTENSIONS`` (``.gif``, ``.webp``, ...) are skipped with a warning
    that counts them.

    Raises:
        DatasetError: a path does not exist, or a folder holds no image.
    """
    paths = []
    for item in map(Path, inputs):
        if item.is_dir():
            found, skipped = _images_in(item)
            if not found:
                raise DatasetError(f"{item} holds no images ({', '.join(IMAGE_EXTENSIONS)}).")
            if skipped:
                logger.warning("%s: %d files skipped, not of the image formats read (%s)", item, skipped,
                               ", ".join(IMAGE_EXTENSIONS))
            paths += found
        elif item.is_file():
            paths.append(item)
        else:
            raise DatasetError(f"{item} does not exist.")
    return paths


def read_rgb(path, size=None):
    """The project's one image reader: every input path, cache, ``predict``, ``classify()`` and
    ``caption`` reads an image file through it.

    PIL decodes the file (any of ``IMAGE_EXTENSIONS``: JPEG, PNG, BMP, PPM, TIFF), turns it
    upright by its EXIF orientation tag (``PIL.ImageOps.exif_transpose``; phone photos are
    stored sideways with the tag), converts it to RGB (grayscale repeated, CMYK and palettes
    converted) and resizes it bilinearly to ``size x size``, as Keras'
    ``load_img(target_size=..., interpolation="bilinear")`` does (aspect ratio not kept).

    Args:
        path: an image file.
        size: output height and width in pixels; ``None`` keeps the file's size.

    Returns:
        ``(size, size, 3)`` float32 RGB 0..255.

    Raises:
        DatasetError: a 16- or 32-bit image (PIL modes I;16, I, F), which a conversion to
            8-bit RGB would clip to white (the message says how to convert it), or a file that
            cannot be read or decoded, truncated included (the message names it): every reader,
            feature caches and ``--skip-image-check`` runs included, names the file.
    """
    try:
        rgb = open_rgb(path)
        if size is not None:
            rgb = rgb.resize((size, size), Image.BILINEAR)
    except DatasetError:
        raise
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        raise DatasetError(f"{ascii(str(path))} cannot be decoded as an image ({type(error).__name__}: "
                           f"{error}).") from error
    return np.asarray(rgb, np.float32)


def open_rgb(path):
    """``read_rgb``'s decoding: the file as an upright RGB ``PIL.Image`` (fully decoded), with the
    same errors; ``check_images`` runs it on every file."""
    with Image.open(path) as image:
        if image.mode in WIDE_MODES:
            how = ("e.g. PIL: image.point(lambda v: v / 257).convert('L')" if "16" in image.mode else
                   "scale its values to 0..255 first: its range is the camera's or the program's, not 16-bit's")
            raise DatasetError(
                f"{ascii(str(path))}: a {image.mode} ({'16' if '16' in image.mode else '32'}-bit) image; convert it "
                f"to 8 bits per channel ({how})")
        return ImageOps.exif_transpose(image).convert("RGB")


def as_inputs(inputs):
    """The inputs of ``classify()``/``caption()`` as a list: a single path (``str`` or ``PathLike``)
    or a single image array (2-D, or 3-D with 1, 3 or 4 channels last) is one input, not a
    sequence of characters or rows; anything else is iterated."""
    if isinstance(inputs, (str, bytes, os.PathLike)):
        return [inputs]
    if isinstance(inputs, np.ndarray) and (inputs.ndim == 2 or (inputs.ndim == 3 and inputs.shape[-1] in (1, 3, 4))):
        return [inputs]
    return list(inputs)


def image_array(array, name="the array"):
    """Checks an image array against the Python API's contract and returns it as ``(height, width,
    3)`` RGB, uint8 or float32 in 0..255.

    The contract: uint8 RGB ``(height, width, 3)``, grayscale ``(height, width)`` or ``(height,
    width, 1)`` (repeated to RGB), or RGBA ``(height, width, 4)`` (alpha dropped, as a file's is);
    or the same shapes in float, values in 0..255.

    Raises:
        UsageError: naming ``name``, the dtype and the shape: another dtype (uint16, int, bool,
            complex, object: say how to convert), NaN or infinite values, values outside 0..255,
            a float array whose maximum is in (0, 1] (scaled 0..1: multiply by 255), an empty or
            otherwise shaped array.
    """
    array = np.asarray(array)
    what = f"{name} (dtype {array.dtype}, shape {array.shape})"
    if array.dtype != np.uint8 and array.dtype.kind != "f":
        hint = " divide by 257 and convert to uint8" if array.dtype == np.uint16 else " convert it to uint8"
        raise UsageError(f"{what}: an image array must be uint8 RGB or float RGB in 0..255;{hint}.")
    shape_ok = array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (1, 3, 4))
    if not shape_ok or array.size == 0:
        raise UsageError(f"{what}: an image array must be a non-empty (height, width, 3) RGB, (height, width, 4) "
                         "RGBA or (height, width) grayscale array.")
    if array.dtype.kind == "f":
        if not np.isfinite(array).all():
            raise UsageError(f"{what}: holds NaN or infinite values.")
        low, high = float(array.min()), float(array.max())
        if low < 0 or high > 255:
            raise UsageError(f"{what}: values from {low:g} to {high:g}; RGB 0..255 is expected.")
        if 0 < high <= 1:
            raise UsageError(f"{what}: values at most {high:g}, as if scaled to 0..1; RGB 0..255 is expected: "
                             "multiply by 255.")
    if array.ndim == 3 and array.shape[-1] == 4:
        array = array[..., :3]
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    return array


def rgb_array(item, size, name=None):
    """One image at ``size x size`` as float32 RGB 0..255: ``(size, size, 3)``.

    Args:
        item: an image file (``read_rgb``: EXIF orientation applied, converted to RGB,
            bilinear resize, as training reads it) or an array under ``image_array``'s contract
            (uint8, or float in 0..255; RGB, RGBA or grayscale). An array already at ``size`` is
            used as it is; another is rounded to uint8 and resized like a file.
        size: output height and width in pixels.
        name: what the errors call an array (``"input 3"``; default ``"the array"``).

    Raises:
        UsageError: an array outside the contract (``image_array``); DatasetError: a file that
            cannot be decoded, or a 16- or 32-bit image (``read_rgb``).
    """
    if isinstance(item, (str, os.PathLike)):
        return read_rgb(item, size)  # a file it cannot decode: DatasetError naming it
    array = image_array(item, name or "the array")
    if array.shape[:2] == (size, size):
        return array.astype(np.float32)
    image = Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), "RGB")
    return np.asarray(image.resize((size, size), Image.BILINEAR), np.float32)
