#!/usr/bin/env python
"""LRCN against the clip-level linear probe, cross-validated by group.

One fixed test split of a few dozen clips decides little: on ten UCF101 classes
the test split holds 32 clips, one clip is 3.1 points and a standard error about 8. Here
every clip of a frame dataset (all of its splits pooled) is held out exactly once: each
class's UCF101 groups (``v_<Class>_g<group>_c<clip>``, ``helpers.extract_frames.group_of``)
are dealt round-robin into ``--folds`` folds (``assign_folds``), so no group spans two folds; fold ``k`` is the
test split, fold ``k + 1`` the val split (checkpoint choice, the probe's L2), the others train.
For each fold ``lrcn.py train`` runs in a child process with the flags after ``--``, and
``benchmarks/lrcn_probe.py`` on the same splits and frames. Reported: top-1 of both over all
clips, their difference with its paired standard error, and the LRCN's top-1 with each clip's
frames shuffled.

    python benchmarks/lrcn_crossval.py --data-dir DATA --work-dir runs/cv --weights PATH \\
        --frames 8 --image-size 96 -- --dense-units 256 --gru-units 128 --batch-size 4 ...

The work folder, new or empty, holds each fold's split (symbolic links to the clip folders) and run.
Measurements only: nothing here is part of the tests.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def clips_by_class(data_dir):
    """``{class: [clip folder, ...]}`` over every split folder of a class-folders frame dataset."""
    from helpers.sequences import natural_key

    classes = {}
    for split in sorted(p for p in Path(data_dir).iterdir() if p.is_dir()):
        for class_folder in (p for p in split.iterdir() if p.is_dir()):
            classes.setdefault(class_folder.name, []).extend(p for p in class_folder.iterdir() if p.is_dir())
    return {name: sorted(clips, key=lambda p: natural_key(p.name)) for name, clips in sorted(classes.items())}


def assign_folds(classes, folds):
    """``{clip folder: fold}``: each class's groups, in natural order, dealt round-robin to the folds,
    class ``i`` starting at fold ``i % folds`` so that the folds' sizes stay close."""
    from helpers.extract_frames import group_of
    from helpers.sequences import natural_key

    assigned = {}
    for number, (name, clips) in enumerate(classes.items()):
        groups = sorted({group_of(clip) for clip in clips}, key=natural_key)
        if len(groups) < folds:
            raise SystemExit(f"class {name} has {len(groups)} groups, fewer than --folds {folds}")
        fold_of = {group: (number + index) % folds for index, group in enumerate(groups)}
        assigned.update({clip: fold_of[group_of(clip)] for clip in clips})
    return assigned


def write_fold(folder, assigned, fold, folds):
    """The fold's dataset as symbolic links: test = ``fold``, val = ``fold + 1``, train = the rest."""
    roles = {fold: "test", (fold + 1) % folds: "val"}
    for clip, clip_fold in assigned.items():
        link = folder / roles.get(clip_fold, "train") / clip.parent.name / clip.name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(clip.resolve(), target_is_directory=True)


def lrcn_test_predictions(run_dir, data_dir, batch_size):
    """The class index predicted for every test clip (``list_sequences`` order) by the run's best model."""
    import keras

    from helpers import sequences

    metrics = json.loads((run_dir / "metrics.json").read_text())
    model = keras.saving.load_model(metrics["model"])
    classes = json.loads((run_dir / "classes.json").read_text())["class_names"]
    split = sequences.list_sequences(data_dir / "test", classes)
    reader = sequences.FrameSequences(split, model.input_shape[2], batch_size, model.input_shape[1])
    predictions = model.predict(reader, verbose=0).argmax(axis=-1).tolist()
    return predictions, split.labels, metrics["shuffled_frames_top1"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True, help="a class-folders frame dataset")
    parser.add_argument("--work-dir", type=Path, required=True)
    parser.add_argument("--weights", default="imagenet")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--folds", type=int, default=4)
    parser.add_argument("--markdown", type=Path, help="also write the tables here")
    parser.add_argument("lrcn_flags", nargs="*", help="after --: more lrcn.py train flags")
    args = parser.parse_args(argv)
    if args.work_dir.exists() and any(args.work_dir.iterdir()):  # stale links could put a clip in two splits
        raise SystemExit(f"--work-dir {args.work_dir} is not empty; give a new folder")

    import numpy as np

    from benchmarks import lrcn_probe

    assigned = assign_folds(clips_by_class(args.data_dir), args.folds)
    lines = ["| fold | test clips | LRCN top-1 | probe top-1 | LRCN, frames shuffled | LRCN train s |",
             "| --- | --- | --- | --- | --- | --- |"]
    lrcn_correct, probe_correct, shuffled = [], [], []
    for fold in range(args.folds):
        folder = args.work_dir / f"fold{fold}"
        data_dir, run_dir = folder / "data", folder / "run"
        write_fold(data_dir, assigned, fold, args.folds)
        command = [sys.executable, str(ROOT / "lrcn.py"), "train", "--data-dir", str(data_dir), "--output-dir",
                   str(run_dir), "--weights", args.weights, "--frames", str(args.frames), "--image-size",
                   str(args.image_size), *args.lrcn_flags]
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - start
        predictions, labels, shuffled_top1 = lrcn_test_predictions(run_dir, data_dir, 4)
        probe_json = folder / "probe.json"
        lrcn_probe.main(["--data-dir", str(data_dir), "--frames", str(args.frames), "--image-size",
                         str(args.image_size), "--weights", args.weights, "--json", str(probe_json)])
        probe = json.loads(probe_json.read_text())["test_predictions"]
        lrcn_hits = np.equal(predictions, labels)
        probe_hits = np.equal(probe, labels)
        lrcn_correct += lrcn_hits.tolist()
        probe_correct += probe_hits.tolist()
        shuffled.append((shuffled_top1, len(labels)))
        lines.append(f"| {fold} | {len(labels)} | {lrcn_hits.mean():.1%} | {probe_hits.mean():.1%} | "
                     f"{shuffled_top1:.1%} | {seconds:.0f} |")
    lrcn_hits, probe_hits = np.asarray(lrcn_correct, float), np.asarray(probe_correct, float)
    difference = lrcn_hits - probe_hits
    n = len(difference)
    shuffled_top1 = sum(top1 * count for top1, count in shuffled) / n
    lines += ["", "| clips held out | LRCN top-1 | probe top-1 | difference (paired standard error) | "
              "LRCN, frames shuffled |", "| --- | --- | --- | --- | --- |",
              f"| {n} | **{lrcn_hits.mean():.1%}** | {probe_hits.mean():.1%} | {difference.mean():+.1%} "
              f"({difference.std(ddof=1) / np.sqrt(n):.1%}) | {shuffled_top1:.1%} |"]
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        args.markdown.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
