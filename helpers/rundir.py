"""The output directory of a training run: every file's name, in one place.

    args.json              the resolved command-line arguments (``helpers.cli.save_args``)
    classes.json           class names (and descriptions) in the model's output order
    <phase>_best.keras     best model of a phase by its monitored metric
    <phase>_log.csv        one row per epoch (``keras.callbacks.CSVLogger``, appended on resume)
    <phase>_curves.png     the phase's learning curves
    <phase>_done.json      written when the phase completes; a rerun skips the phase
    backup/<phase>/        resume state while the phase runs, deleted when it ends
    logs/<phase>/          TensorBoard logs
    metrics.json           the evaluation of the final model
    confusion_matrix.png   its row-normalised confusion matrix

Phases are named ``phase1`` (backbone frozen) and ``phase2`` (fine-tuning).
"""

import csv
import math
from pathlib import Path

ARGS = "args.json"
CLASSES = "classes.json"
METRICS = "metrics.json"
CONFUSION_MATRIX = "confusion_matrix.png"
BACKUP = "backup"
LOGS = "logs"


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


def classes_beside(model_path):
    """The ``classes.json`` written next to a saved model of a run."""
    return Path(model_path).with_name(CLASSES)


def read_history(csv_path):
    """Reads a ``CSVLogger`` file into ``{column: [values by epoch]}``.

    A row repeated for the same epoch (written just before an interruption and
    again on resume) counts once, the last one winning. A missing file is ``{}``.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        return {}
    rows = {}
    with csv_path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            rows[int(row["epoch"])] = row
    history = {}
    for epoch in sorted(rows):
        for key, value in rows[epoch].items():
            history.setdefault(key, []).append(float(value) if value not in ("", None) else math.nan)
    return history
