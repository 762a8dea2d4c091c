#!/usr/bin/env python
"""Turn a Tiny ImageNet download into the class-folder layout Keras reads.

Source: seed write-up ``000_*.txt`` ("Dataset Structure"): Keras'
``flow_from_directory`` expects ``<split>/<class>/<image>``, and Tiny ImageNet is
not shipped that way. The original script re-saved every image through PIL,
deleted the originals as it went and could not be run twice. This one never
decodes an image, checks everything before it touches anything, and can be run
again (or after a crash) with the same command.

Input, Tiny ImageNet's raw layout (tiny-imagenet-100-A, tiny-imagenet-200)::

    SRC/wnids.txt                      one WordNet id per line: the classes
    SRC/words.txt                      wnid<TAB>names (optional)
    SRC/train/<wnid>/images/*.JPEG     (and <wnid>_boxes.txt, skipped)
    SRC/val/images/*.JPEG              with SRC/val/val_annotations.txt:
                                       file<TAB>wnid<TAB>x0<TAB>y0<TAB>x1<TAB>y1
    SRC/test/images/*.JPEG             unlabelled

Output::

    OUT/train/<wnid>/*.JPEG
    OUT/val/<wnid>/*.JPEG
    OUT/test/<wnid>/*.JPEG             only with --holdout N, carved from train
    OUT/test_unlabelled/*.JPEG         the official, unlabelled test images
    OUT/wnids.txt, OUT/words.txt       copied (for class names)

Usage::

    python -m helpers.restructure_dataset SRC --output OUT [--holdout 50] [--classes 100]
    python -m helpers.restructure_dataset SRC --in-place [--dry-run]
    python helpers/restructure_dataset.py SRC --output OUT ...     (the same, run as a file)

or from Python: ``restructure(src, output=..., holdout=..., ...)``.

Standard library only (with ``helpers.formats``), so it runs before anything else is installed.
"""

import argparse
import concurrent.futures
import dataclasses
import errno
import hashlib
import json
import logging
import os
import random
import shutil
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file (python helpers/restructure_dataset.py): the repository on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import rundir  # noqa: E402 (standard library only, as this tool)
from helpers.formats import IMAGE_EXTENSIONS, file_digest, read_text  # other files in an image folder are stray files

logger = logging.getLogger(__name__)

MARKER = ".restructure_complete.json"
JOURNAL = ".restructure_journal.json"
PROGRESS = ".restructure_progress"  # in place: index of the next step after the last folder renamed
STAGING = "train.restructuring"  # in place: the new train/ while it is being built
LINK_THREADS = 4  # hard links into different folders proceed in parallel
PROGRESS_MIN_FILES = 10_000  # trees this large report progress, every 10% of the files


class LayoutError(ValueError):
    """The source tree is not a valid Tiny ImageNet download; nothing was changed."""


@dataclasses.dataclass
class Summary:
    """What a run did (or, with ``dry_run``, would do).

    Attributes:
        classes: number of classes in the output.
        images: images per output split, e.g. ``{"train": 45000, "val": 5000, ...}``.
        stray_files: files skipped because they are not images (``.DS_Store``,
            ``*_boxes.txt``, ...), or images no annotation row names.
        excluded_images: images of classes left out by ``classes=N``.
        copies_left_out: ``[held-out image, its twin in train]`` relative paths: held-out images
            (val, or ``--holdout``'s test) whose bytes equal an image that trains, kept out of
            their split (a val copy is not written; a test copy stays in train) so that no
            image is scored that was trained on.
        transfer: ``"link"``, ``"copy"``, ``"move"``, or ``"none"`` (already complete).
        already_complete: the output was a finished tree and was left alone.
    """

    classes: int = 0
    images: dict = dataclasses.field(default_factory=dict)
    stray_files: int = 0
    excluded_images: int = 0
    copies_left_out: list = dataclasses.field(default_factory=list)
    transfer: str = "none"
    already_complete: bool = False

    def describe(self):
        splits = ", ".join(f"{split} {count}" for split, count in self.images.items())
        state = " (already complete, left alone)" if self.already_complete else ""
        return (
            f"{self.classes} classes; images: {splits}; stray files skipped: "
            f"{self.stray_files}; images of excluded classes: {self.excluded_images}; "
            f"held-out copies of training images left out: {len(self.copies_left_out)}; "
            f"transfer: {self.transfer}{state}"
        )


def _is_image(name):
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _check_name(name, where):
    """Return ``name`` if it is a plain file name inside its folder, else a problem."""
    if (
        not name
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or os.path.isabs(name)
    ):
        return f"{where}: {name!r} is not a plain file name (it points outside the dataset root)"
    return None


def _read_wnids(src):
    path = src / "wnids.txt"
    if not path.is_file():
        raise LayoutError(f"{path} is missing: it lists the classes (one WordNet id per line).")
    wnids, problems = [], []
    for number, line in enumerate(read_text(path).splitlines(), 1):
        wnid = line.strip()
        if not wnid:
            continue
        problem = _check_name(wnid, f"{path}:{number}")
        if problem:
            problems.append(problem)
        elif wnid in wnids:
            problems.append(f"{path}:{number}: duplicate wnid {wnid!r}")
        else:
            wnids.append(wnid)
    if not wnids and not problems:
        problems.append(f"{path} lists no classes")
    return wnids, problems


def _list_folder(folder):
    """Sorted image names and the count of stray files in ``folder`` (not recursive)."""
    images, stray = [], 0
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.is_file() and _is_image(entry.name):
            images.append(entry.name)
        else:
            stray += 1
    return images, stray


def _plan(src, wnids, holdout, seed, selected, in_place=False):
    """Every transfer as ``(source, destination)`` relative paths, checked, and the counts.

    In output mode every image is one transfer. In place, whole folders are renamed
    where possible (``train/<wnid>/images`` becomes ``train/<wnid>``, ``test/images``
    becomes ``test_unlabelled``), so the work grows with the classes, not the images;
    the ``<wnid>_boxes.txt`` annotation files stay in ``train_annotations/<wnid>/``.

    Raises:
        LayoutError: listing every problem found, before anything is changed.
    """
    problems, moves, train_sources = [], [], []
    summary = Summary(classes=len(selected))
    images = {"train": 0, "val": 0}
    if holdout:
        images["test"] = 0
    wnid_set, selected_set = set(wnids), set(selected)

    train = src / "train"
    if not train.is_dir():
        problems.append(f"{train} is missing")
    else:
        for entry in sorted(os.scandir(train), key=lambda e: e.name):
            if not entry.is_dir():
                summary.stray_files += 1
            elif entry.name not in wnid_set:
                problems.append(f"{train / entry.name}: wnid {entry.name!r} is not in wnids.txt")
        for wnid in selected:
            folder = train / wnid / "images"
            if not folder.is_dir():
                problems.append(f"{folder} is missing (class {wnid} of wnids.txt)")
                continue
            names, stray = _list_folder(folder)
            # <wnid>_boxes.txt and anything else beside images/ is stray too.
            summary.stray_files += stray + sum(1 for e in os.scandir(train / wnid) if e.name != "images")
            if holdout and len(names) <= holdout:
                problems.append(
                    f"{folder}: {len(names)} images, too few to hold out {holdout} and still train"
                )
                continue
            held = set(random.Random(f"{seed}:{wnid}").sample(names, holdout)) if holdout else set()
            for name in names:
                split = "test" if name in held else "train"
                if split == "train":
                    train_sources.append(f"train/{wnid}/images/{name}")
                if split == "test" or not in_place:
                    moves.append((f"train/{wnid}/images/{name}", f"{split}/{wnid}/{name}"))
                images[split] += 1
            if in_place:  # after its held-out images have left it
                moves.append((f"train/{wnid}/images", f"{STAGING}/{wnid}"))
        for wnid in wnid_set - selected_set:
            folder = train / wnid / "images"
            if folder.is_dir():
                summary.excluded_images += len(_list_folder(folder)[0])

    val = src / "val"
    annotations = val / "val_annotations.txt"
    if not annotations.is_file():
        problems.append(f"{annotations} is missing")
    else:
        seen = {}
        available = set(_list_folder(val / "images")[0]) if (val / "images").is_dir() else set()
        for number, line in enumerate(read_text(annotations).splitlines(), 1):
            if not line.strip():
                continue
            where = f"{annotations}:{number}"
            fields = line.split("\t")
            if len(fields) < 2:
                problems.append(f"{where}: expected 'file<TAB>wnid<TAB>box', got {line!r}")
                continue
            name, wnid = fields[0].strip(), fields[1].strip()
            problem = _check_name(name, where)
            if problem:
                problems.append(problem)
            elif name in seen:
                problems.append(f"{where}: duplicate row for {name} (first at line {seen[name]})")
            elif wnid not in wnid_set:
                problems.append(f"{where}: wnid {wnid!r} of {name} is not in wnids.txt")
            elif name not in available:
                problems.append(f"{where}: {val / 'images' / name} is missing")
            elif wnid in selected_set:
                moves.append((f"val/images/{name}", f"val/{wnid}/{name}"))
                images["val"] += 1
            else:
                summary.excluded_images += 1
            seen.setdefault(name, number)
        summary.stray_files += len(available - set(seen))
        if (val / "images").is_dir():
            summary.stray_files += sum(1 for e in os.scandir(val / "images") if not _is_image(e.name))

    if not problems:
        moves = _leave_out_copies(src, moves, train_sources, images, summary, in_place)

    test_images = src / "test" / "images"
    if test_images.is_dir():
        names, stray = _list_folder(test_images)
        summary.stray_files += stray
        if in_place:
            moves.append(("test/images", "test_unlabelled"))
        else:
            moves.extend((f"test/images/{name}", f"test_unlabelled/{name}") for name in names)
        images["test_unlabelled"] = len(names)
    if in_place and train.is_dir():
        moves += [("train", "train_annotations"), (STAGING, "train")]

    if problems:
        shown = "\n  ".join(problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        raise LayoutError(
            f"{src} is not a valid Tiny ImageNet tree; nothing was changed. "
            f"{len(problems)} problem(s):\n  {shown}{more}"
        )
    summary.images = images
    return moves, summary


def _leave_out_copies(src, moves, train_sources, images, summary, in_place):
    """Keeps held-out images whose bytes equal a training image out of their split: a val copy is
    not transferred, a ``--holdout`` test copy stays in train. Records each pair in
    ``summary.copies_left_out`` and updates ``images``; returns the moves left."""
    held = [(i, source, destination) for i, (source, destination) in enumerate(moves)
            if destination.split("/", 1)[0] in ("val", "test")]
    if not held:
        return moves
    with concurrent.futures.ThreadPoolExecutor(LINK_THREADS) as pool:
        trained = dict(zip(pool.map(file_digest, [src / s for s in train_sources], chunksize=256), train_sources))
        digests = list(pool.map(file_digest, [src / source for _, source, _ in held], chunksize=256))
    dropped = {}
    for (index, source, destination), digest in zip(held, digests):
        twin = trained.get(digest)
        if twin is None:
            continue
        split, wnid, name = destination.split("/", 2)
        summary.copies_left_out.append([source, twin])
        images[split] -= 1
        if split == "test":  # held out from train: it stays there
            images["train"] += 1
            dropped[index] = None if in_place else (source, f"train/{wnid}/{name}")
        else:
            dropped[index] = None
    return [dropped.get(i, move) for i, move in enumerate(moves) if dropped.get(i, move) is not None]


class _Linker:
    """Hard links, else copies (across filesystems); atomic per file. Thread-safe."""

    def __init__(self):
        self.mode = "link"
        self._folders = set()

    def __call__(self, source, destination):
        folder = os.path.dirname(destination)
        if folder not in self._folders:
            os.makedirs(folder, exist_ok=True)
            self._folders.add(folder)
        try:
            if self.mode == "link":
                try:
                    os.link(source, destination)
                    return
                except OSError as error:
                    if error.errno not in (errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EMLINK):
                        raise
                    logger.info("hard links are not possible here (%s); copying instead", error.strerror)
                    self.mode = "copy"
            if os.path.exists(destination):
                raise FileExistsError(destination)
            partial = destination + ".partial"
            shutil.copy2(source, partial)
            os.replace(partial, destination)  # a crash never leaves a half-written image
        except FileExistsError:  # done by an earlier, interrupted run
            if os.stat(destination).st_size != os.stat(source).st_size:
                raise LayoutError(f"{destination} already exists and differs from {source}; nothing overwritten.")


def _log_progress(done, total, count):
    """Logs every 10% of a large tree's files; ``count`` files were just added to ``done``."""
    if total >= PROGRESS_MIN_FILES and done * 10 // total > (done - count) * 10 // total:
        logger.info("%d/%d files (%.0f%%)", done, total, 100 * done / total)


def _link_all(src, root, moves):
    """Output mode: links every ``(source, destination)``, in threads; returns the transfer mode."""
    linker, total = _Linker(), len(moves)
    pairs = [(os.path.join(src, a), os.path.join(root, b)) for a, b in moves]
    chunks = [pairs[i:i + 1000] for i in range(0, total, 1000)]
    done = 0
    with concurrent.futures.ThreadPoolExecutor(LINK_THREADS) as pool:
        for count in pool.map(lambda chunk: [linker(a, b) for a, b in chunk] and len(chunk), chunks):
            done += count
            _log_progress(done, total, count)
    return linker.mode


def _move_all(src, moves):
    """In place: renames every ``(source, destination)`` in order, resumable.

    A step is done when its source is gone and its destination exists. Folder renames
    can recreate a path an earlier step used (``train``), so the index after the last
    folder renamed is recorded, and a rerun starts there.
    """
    progress = src / PROGRESS
    first = int(progress.read_text()) if progress.is_file() else 0
    folders = set()
    for index in range(first, len(moves)):
        source, destination = os.path.join(src, moves[index][0]), os.path.join(src, moves[index][1])
        if os.path.lexists(source):
            if os.path.lexists(destination):
                raise LayoutError(f"Both {source} and {destination} exist; remove one and run again.")
            parent = os.path.dirname(destination)
            if parent not in folders:
                os.makedirs(parent, exist_ok=True)
                folders.add(parent)
            is_folder = os.path.isdir(source)
            os.replace(source, destination)
            if is_folder:
                _write_text(progress, str(index + 1))
        elif not os.path.lexists(destination):
            raise LayoutError(f"{source} is missing and was not moved to {destination}.")
        _log_progress(index + 1, len(moves), 1)
    progress.unlink(missing_ok=True)


def _write_text(path, text):
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


def _options_key(wnids, holdout, seed, classes):
    text = json.dumps({"wnids": wnids, "holdout": holdout, "seed": seed, "classes": classes})
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _write_json(path, data):
    _write_text(path, json.dumps(data, indent=1))


def restructure(src, output=None, in_place=False, holdout=0, classes=None, seed=0, dry_run=False):
    """Reorganise a Tiny ImageNet download into ``<split>/<wnid>/<image>`` folders.

    Everything is checked before anything changes. Output mode links (or copies)
    into a new tree and never modifies ``src``; in-place mode moves files and keeps
    a journal, so that a killed run finishes when run again. A finished tree
    carries a marker and is left alone.

    Args:
        src: root of the download (``wnids.txt``, ``train/``, ``val/``, ``test/``).
        output: folder for the new tree. Exactly one of ``output`` and ``in_place``.
        in_place: move files inside ``src`` instead, as the original script did.
        holdout: images per class carved from train into a labelled ``test/`` split
            (0 for none). Chosen with ``random.Random(f"{seed}:{wnid}")``, so the
            same seed gives the same split.
        classes: keep only the first N wnids of ``wnids.txt`` (``None`` keeps all).
        seed: integer seed of the holdout choice.
        dry_run: only plan and report; change nothing.

    Returns:
        A ``Summary`` of the classes, images per split and skipped files.

    Raises:
        LayoutError: the tree is not valid (missing files, unknown or duplicate rows,
            names outside the root); the message lists every problem. Nothing changed.
        ValueError: bad arguments (``holdout < 0``, ``classes < 1``, both or neither
            of ``output`` and ``in_place``, ``output`` equal to ``src``).
    """
    src = Path(src).resolve()
    if (output is None) == (not in_place):
        raise ValueError("Give exactly one of output=DIR and in_place=True.")
    if holdout < 0:
        raise ValueError(f"holdout must be >= 0. Received: holdout={holdout}")
    if classes is not None and classes < 1:
        raise ValueError(f"classes must be >= 1. Received: classes={classes}")
    if classes is not None and in_place:
        raise ValueError(
            "classes=N needs output=DIR: in place, the excluded classes would stay in train/ "
            "and be read as classes."
        )
    if not src.is_dir():
        raise LayoutError(f"Dataset root {src} does not exist or is not a folder.")
    root = src if in_place else Path(output).resolve()
    if not in_place and root == src:
        raise ValueError(f"output is the source folder {src}; use in_place=True for that.")
    if not dry_run:  # a file is created where the output goes, and removed, before anything is read
        rundir.check_writable(root, "in place: the source" if in_place else "--output", folder=True, empty=False)

    wnids, problems = _read_wnids(src)
    if problems:
        raise LayoutError(f"{src} is not a valid Tiny ImageNet tree; nothing was changed:\n  " + "\n  ".join(problems))
    selected = wnids[:classes] if classes else wnids
    key = _options_key(selected, holdout, seed, classes)

    marker = root / MARKER
    if marker.is_file():
        done = json.loads(marker.read_text(encoding="utf-8"))
        if done.get("options") != key:
            raise ValueError(
                f"{root} was already restructured with other options ({done.get('arguments')}); "
                "use a new output folder."
            )
        summary = Summary(**done["summary"])
        summary.already_complete = True
        return summary

    journal = src / JOURNAL
    if in_place and journal.is_file():  # an interrupted in-place run: finish its plan
        state = json.loads(journal.read_text(encoding="utf-8"))
        if state["options"] != key:
            raise ValueError(
                f"An unfinished in-place run with other options ({state['arguments']}) left {journal}; "
                "run it again with those options to finish it."
            )
        moves, summary = [tuple(m) for m in state["moves"]], Summary(**state["summary"])
    else:
        moves, summary = _plan(src, wnids, holdout, seed, selected, in_place)
    arguments = {"holdout": holdout, "classes": classes, "seed": seed}

    if dry_run:
        summary.transfer = "move" if in_place else "link or copy"
        for source, destination in moves[:5]:
            print(f"  {source} -> {destination}")
        if len(moves) > 5:
            print(f"  ... {len(moves) - 5} more")
        return summary

    if in_place:
        if not journal.is_file():
            _write_json(journal, {"options": key, "arguments": arguments, "moves": moves,
                                  "summary": dataclasses.asdict(summary)})
        _move_all(src, moves)
        summary.transfer = "move"
        for folder in (src / "val" / "images", src / "test"):
            try:
                folder.rmdir()  # only succeeds when empty: stray files are kept
            except FileNotFoundError:
                pass
            except OSError:
                if folder.name == "images":
                    logger.warning("%s kept: it still holds stray or unannotated files", folder)
    else:
        summary.transfer = _link_all(src, root, moves)
        for name in ("wnids.txt", "words.txt"):
            if (src / name).is_file():
                shutil.copyfile(src / name, root / name)
    _write_json(marker, {"options": key, "arguments": arguments, "summary": dataclasses.asdict(summary)})
    if in_place:
        journal.unlink()
    return summary


def _parse_args(argv):
    parser = argparse.ArgumentParser(
        description="Reorganise a Tiny ImageNet download into train/<wnid>/, val/<wnid>/ "
        "(and a labelled test/<wnid>/ holdout) for flow_from_directory.",
    )
    parser.add_argument("src", help="root of the download (holds wnids.txt, train/, val/, test/)")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--output", help="build the new tree here, with hard links when possible, "
                       "copies otherwise; SRC is left untouched")
    where.add_argument("--in-place", action="store_true", help="move the files inside SRC (default: off)")
    parser.add_argument("--holdout", type=int, default=0,
                        help="images per class carved from train into a labelled test/ split (default: 0)")
    parser.add_argument("--classes", type=int, default=None,
                        help="keep only the first N wnids of wnids.txt (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the holdout choice (default: 0)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, change nothing (default: off)")
    return parser.parse_args(argv)


def main(argv=None):
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        summary = restructure(
            args.src, output=args.output, in_place=args.in_place, holdout=args.holdout,
            classes=args.classes, seed=args.seed, dry_run=args.dry_run,
        )
    except ValueError as error:  # LayoutError included
        logger.error("error: %s", error)
        return 2
    print(("dry run, nothing changed: " if args.dry_run else "") + summary.describe())
    for held, twin in summary.copies_left_out[:10]:
        print(f"  left out of its split: {held} (the same bytes as {twin}, which trains)")
    if len(summary.copies_left_out) > 10:
        print(f"  ... and {len(summary.copies_left_out) - 10} more")
    return 0


if __name__ == "__main__":
    sys.exit(main())
