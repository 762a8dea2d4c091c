"""The output directory of a training run: every file's name, in one place.

    args.json              the resolved command-line arguments (``helpers.cli.save_args``)
    classes.json           class names (and descriptions) in the model's output order
    <phase>_best.keras     best model of a phase by its monitored metric
    <phase>_log.csv        one row per epoch (``keras.callbacks.CSVLogger``, appended on resume)
    <phase>_curves.png     the phase's learning curves
    <phase>_done.json      written when the phase completes; a rerun skips the phase
    backup/<phase>/        resume state while the phase runs (the last two epochs' weights and
                           optimizer state), deleted when the phase is complete
    logs/<phase>/          TensorBoard logs
    metrics.json           the evaluation of the final model
    vocabulary.json        a captioning run's words, in id order (``helpers.captions.Vocabulary``)
    features/              cached backbone features of a frozen-backbone phase (``helpers.features``)
    captions.json          a captioning run's generated captions of the evaluated split
    captions.png           a grid of those images with generated and reference captions
    confusion_matrix.png   its row-normalised confusion matrix
    .lock                  held (``fcntl.flock``) by the run using the folder; holds its process id

Phases are named ``phase1`` (backbone frozen), ``phase2`` (fine-tuning) and, for the captioner,
``phase3`` (self-critical training of its decoder).

Crash safety: every file a later run reads (checkpoints, backups, JSON) is written to a
temporary name beside it (``<name>.partial.<suffix>``) and renamed into place with
``os.replace``, so a kill or a full disk leaves the old file or the new one, never half of
one. Only the CSV logs are appended to; their reader skips a row cut short.
"""

import contextlib
import csv
import errno
import math
import os
import tempfile
from pathlib import Path

from helpers.errors import UsageError

try:
    import fcntl
except ImportError:  # not on Windows: runs there are not locked
    fcntl = None

ARGS = "args.json"
CLASSES = "classes.json"
METRICS = "metrics.json"
CONFUSION_MATRIX = "confusion_matrix.png"
BACKUP = "backup"
LOGS = "logs"
LOCK = ".lock"
VOCABULARY = "vocabulary.json"
FEATURES = "features"
CAPTIONS = "captions.json"
CAPTIONS_GRID = "captions.png"


class RunDir:
    """The paths of one run's output directory (nothing is created until written)."""

    def __init__(self, path):
        self.path = Path(path)

    def __repr__(self):
        return f"RunDir({str(self.path)!r})"

    @property
    def args(self):
        return self.path / ARGS

    @property
    def classes(self):
        return self.path / CLASSES

    @property
    def metrics(self):
        return self.path / METRICS

    @property
    def confusion_matrix(self):
        return self.path / CONFUSION_MATRIX

    @property
    def vocabulary(self):
        return self.path / VOCABULARY

    @property
    def features(self):
        return self.path / FEATURES

    @property
    def captions(self):
        return self.path / CAPTIONS

    @property
    def captions_grid(self):
        return self.path / CAPTIONS_GRID

    @property
    def backup_root(self):
        return self.path / BACKUP

    def best(self, phase):
        return self.path / f"{phase}_best.keras"

    def log(self, phase):
        return self.path / f"{phase}_log.csv"

    def curves(self, phase):
        return self.path / f"{phase}_curves.png"

    def done(self, phase):
        return self.path / f"{phase}_done.json"

    def backup(self, phase):
        return self.path / BACKUP / phase

    def tensorboard(self, phase):
        return self.path / LOGS / phase

    def phase_complete(self, phase):
        """True when ``phase`` finished here (its ``<phase>_done.json`` exists)."""
        return self.done(phase).is_file()

    def has_training_logs(self):
        """True when any phase has logged an epoch here."""
        return any(self.path.glob("*_log.csv"))

    @contextlib.contextmanager
    def lock(self):
        """Holds the folder's lock (creating the folder) while the block runs; the lock is
        released when the block ends or the process dies.

        Raises:
            UsageError: the folder cannot be created or written (an existing file, no
                permission), or another process holds the lock (its id is named).
        """
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            handle = open(self.path / LOCK, "a+", encoding="utf-8")
        except OSError as error:
            raise UsageError(f"--output-dir {self.path}: cannot write there ({error.strerror or error}).") from None
        with handle:
            if fcntl is not None:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    handle.seek(0)
                    owner = handle.read().strip() or "unknown"
                    raise UsageError(f"{self.path} is in use by another run (process {owner}); wait for it to "
                                     "end, or use another --output-dir.") from None
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            yield self


def partial_path(path):
    """The temporary name ``path`` is written under before it is renamed into place:
    ``phase1_best.keras`` -> ``phase1_best.partial.keras``, ``e.weights.h5`` ->
    ``e.partial.weights.h5`` (Keras checks the suffixes)."""
    path = Path(path)
    stem, dot, suffixes = path.name.partition(".")
    return path.with_name(f"{stem}.partial{dot}{suffixes}")


def write_atomically(path, write):
    """Calls ``write(temporary_path)``, then renames the file onto ``path`` (``os.replace``,
    after an ``fsync``): a kill or an error leaves the previous ``path`` untouched.

    Raises:
        DiskFullError: the disk filled up (nothing was replaced).
        UsageError: ``path`` cannot be written (permission, a folder in the way).
    """
    path = Path(path)
    partial = partial_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(partial)
        with open(partial, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(partial, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            partial.unlink()
        if is_disk_full(error):
            raise DiskFullError(path) from error
        if isinstance(error, OSError) and not isinstance(error, FileNotFoundError):
            raise UsageError(f"Cannot write {path}: {error.strerror or error}.") from error
        raise


def write_text(path, text):
    """Writes ``text`` (UTF-8) to ``path`` atomically (``write_atomically``)."""
    write_atomically(path, lambda partial: Path(partial).write_text(text, encoding="utf-8"))


class DiskFullError(UsageError):
    """The disk filled up while the run wrote ``path``; nothing already written was lost."""

    def __init__(self, path, needed_bytes=None):
        free = _free_bytes(Path(path).parent)
        need = f" The run needs about {needed_bytes / 2**20:,.0f} MB free for its checkpoints and backups." \
            if needed_bytes else ""
        super().__init__(f"No space left on the disk writing {path} ({free / 2**20:,.0f} MB free).{need} "
                         "Free some space and run the same command again: it resumes from the last completed epoch.")
        self.path = path


def is_disk_full(error):
    """True when ``error`` or an exception it was raised from is a full disk (ENOSPC,
    also as h5py reports it)."""
    while error is not None:
        if isinstance(error, DiskFullError) or (isinstance(error, OSError) and error.errno == errno.ENOSPC) \
                or "No space left on device" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def _free_bytes(folder):
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        stats = os.statvfs(folder)
    except OSError:
        return 0
    return stats.f_bavail * stats.f_frsize


def check_writable(path, flag, folder=False, empty=True):
    """Refuses, before any work, an output path the user named that could not be written later.

    The path's nearest existing ancestor must be a folder in which a file can be created: a
    probe file is created there and removed (``os.access`` says yes to root, and knows nothing of
    read-only mounts or ``/proc``); an existing ``path`` must be a file (``folder=False``) or a
    folder, empty unless ``empty=False`` (``folder=True``).

    Args:
        path: the file or folder to be written.
        flag: the flag that named it, for the message (``"--json"``).
        folder: ``path`` is a folder to create (or to write into, with ``empty=False``).
        empty: with ``folder``, an existing folder must be empty (a folder whose files the
            command owns whole, such as an export).

    Raises:
        UsageError: naming the flag, the path and why.
    """
    path = Path(path)
    if folder and path.exists() and (not path.is_dir() or (empty and any(path.iterdir()))):
        raise UsageError(f"{flag} {path} already exists and is not {'an empty ' if empty else 'a '}folder; "
                         f"choose a new {flag}.")
    if not folder and path.is_dir():
        raise UsageError(f"{flag} {path} is a folder; give a file name.")
    existing = path if folder and path.is_dir() else path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{flag} {path} cannot be written: {existing} is a file, not a folder.")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".write-probe-"):
            pass
    except OSError as error:
        raise UsageError(f"{flag} {path} cannot be written: a file cannot be created in {existing} "
                         f"({error.strerror or error}).") from error


def classes_beside(model_path):
    """The ``classes.json`` written next to a saved model of a run."""
    return Path(model_path).with_name(CLASSES)


def vocabulary_beside(model_path):
    """The ``vocabulary.json`` written next to a saved captioning model of a run."""
    return Path(model_path).with_name(VOCABULARY)


def read_history(csv_path):
    """Reads a ``CSVLogger`` file into ``{column: [values by epoch]}``.

    A row repeated for the same epoch (written just before an interruption and
    again on resume) counts once, the last one winning; a row cut short by a kill or
    a full disk is skipped. A missing file is ``{}``.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        return {}
    rows = {}  # epoch -> {column: value}, the row parsed once
    with csv_path.open(newline="", encoding="utf-8", errors="replace") as handle:
        for row in csv.DictReader(handle):
            if None in row or None in row.values():  # too many or too few fields: cut short
                continue
            try:
                rows[int(row["epoch"])] = {key: float(value) if value != "" else math.nan for key, value in row.items()}
            except ValueError:  # a value cut short, or a stray header
                continue
    history = {}
    for epoch in sorted(rows):
        for key, value in rows[epoch].items():
            history.setdefault(key, []).append(value)
    return history
