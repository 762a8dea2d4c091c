import os
from pathlib import Path

import pytest

from helpers import restructure_dataset as rd
from tests.conftest import write_jpeg


def tree(root):
    """Every file under root, relative, with its size: a snapshot to compare."""
    root = Path(root)
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


def images(root, split):
    return sorted(str(p.relative_to(root / split)) for p in (root / split).rglob("*.JPEG"))


def test_output_layout(tiny_imagenet, tmp_path):
    out = tmp_path / "out"
    summary = rd.restructure(tiny_imagenet, output=out)
    assert summary.classes == 3
    assert summary.images == {"train": 18, "val": 6, "test_unlabelled": 3}
    assert summary.stray_files == 5  # .DS_Store, Thumbs.db, three *_boxes.txt
    assert images(out, "train")[:2] == ["n001/n001_0.JPEG", "n001/n001_1.JPEG"]
    assert len(images(out, "train")) == 18
    assert images(out, "val") == ["n001/val_0.JPEG", "n001/val_3.JPEG", "n002/val_1.JPEG",
                                  "n002/val_4.JPEG", "n003/val_2.JPEG", "n003/val_5.JPEG"]
    assert sorted(p.name for p in (out / "test_unlabelled").iterdir()) == ["test_0.JPEG", "test_1.JPEG", "test_2.JPEG"]
    assert not (out / "test").exists()
    assert (out / "wnids.txt").read_text() == (tiny_imagenet / "wnids.txt").read_text()
    assert (out / "words.txt").is_file()
    # Hard links: same inode, bytes never re-encoded; the source is untouched.
    linked = out / "train" / "n002" / "n002_4.JPEG"
    assert os.path.samefile(linked, tiny_imagenet / "train" / "n002" / "images" / "n002_4.JPEG")
    assert (tiny_imagenet / "val" / "images" / "val_0.JPEG").is_file()


@pytest.mark.tensorflow  # reads the layout with tf.keras
def test_layout_reads_with_keras(tiny_imagenet, tmp_path):
    import keras

    out = tmp_path / "out"
    rd.restructure(tiny_imagenet, output=out)
    dataset = keras.utils.image_dataset_from_directory(out / "val", image_size=(16, 16), batch_size=6, shuffle=False)
    assert dataset.class_names == ["n001", "n002", "n003"]
    _, labels = next(iter(dataset))
    assert labels.numpy().tolist() == [0, 0, 1, 1, 2, 2]


def test_copies_when_links_fail(tiny_imagenet, tmp_path, monkeypatch):
    def no_link(*_):
        raise OSError(18, "Invalid cross-device link")  # EXDEV

    monkeypatch.setattr(os, "link", no_link)
    summary = rd.restructure(tiny_imagenet, output=tmp_path / "out")
    assert summary.transfer == "copy"
    copy = tmp_path / "out" / "train" / "n001" / "n001_0.JPEG"
    source = tiny_imagenet / "train" / "n001" / "images" / "n001_0.JPEG"
    assert copy.read_bytes() == source.read_bytes() and not os.path.samefile(copy, source)


def test_idempotent(tiny_imagenet, tmp_path):
    out = tmp_path / "out"
    first = rd.restructure(tiny_imagenet, output=out, holdout=2, seed=3)
    snapshot = tree(out)
    second = rd.restructure(tiny_imagenet, output=out, holdout=2, seed=3)
    assert second.already_complete and second.images == first.images
    assert tree(out) == snapshot
    with pytest.raises(ValueError, match="other options"):
        rd.restructure(tiny_imagenet, output=out, holdout=1, seed=3)


@pytest.mark.parametrize("in_place", [False, True])
def test_completes_after_crash(tiny_imagenet, tmp_path, monkeypatch, in_place):
    out = None if in_place else tmp_path / "out"
    root = tiny_imagenet if in_place else out
    real_link, real_replace, calls = os.link, os.replace, {"n": 0}

    def crash_after_ten(function):
        def wrapper(src, dst, *args, **kwargs):
            if "JPEG" in str(dst):
                calls["n"] += 1
                if calls["n"] > 10:
                    raise KeyboardInterrupt("killed")
            return function(src, dst, *args, **kwargs)
        return wrapper

    monkeypatch.setattr(os, "link", crash_after_ten(real_link))
    monkeypatch.setattr(os, "replace", crash_after_ten(real_replace))
    with pytest.raises(KeyboardInterrupt):
        rd.restructure(tiny_imagenet, output=out, in_place=in_place, holdout=2)
    assert not (root / rd.MARKER).exists()
    monkeypatch.setattr(os, "link", real_link)
    monkeypatch.setattr(os, "replace", real_replace)

    summary = rd.restructure(tiny_imagenet, output=out, in_place=in_place, holdout=2)
    assert summary.images == {"train": 12, "val": 6, "test": 6, "test_unlabelled": 3}
    train, test = images(root, "train"), images(root, "test")
    assert len(train) == 12 and len(test) == 6 and not set(train) & set(test)
    assert len(images(root, "val")) == 6
    names = [Path(p).name for p in train + test]
    assert sorted(names) == sorted(f"{w}_{i}.JPEG" for w in ("n001", "n002", "n003") for i in range(6))
    assert (root / rd.MARKER).is_file() and not (tiny_imagenet / rd.JOURNAL).exists()


@pytest.mark.parametrize("crash_at", range(1, 19))
def test_in_place_completes_after_crash_at_any_step(tiny_imagenet, monkeypatch, crash_at):
    real_replace, calls = os.replace, {"n": 0}

    def crashing_replace(source, destination):
        if "restructure_" not in str(destination):  # journal and progress writes are not steps
            calls["n"] += 1
            if calls["n"] == crash_at:
                raise KeyboardInterrupt("killed")
        return real_replace(source, destination)

    monkeypatch.setattr(os, "replace", crashing_replace)
    try:
        rd.restructure(tiny_imagenet, in_place=True, holdout=2)
    except KeyboardInterrupt:
        pass
    monkeypatch.setattr(os, "replace", real_replace)
    summary = rd.restructure(tiny_imagenet, in_place=True, holdout=2)
    assert calls["n"] >= min(crash_at, 18)
    assert summary.images == {"train": 12, "val": 6, "test": 6, "test_unlabelled": 3}
    train, test = images(tiny_imagenet, "train"), images(tiny_imagenet, "test")
    names = sorted(Path(p).name for p in train + test)
    assert names == sorted(f"{w}_{i}.JPEG" for w in ("n001", "n002", "n003") for i in range(6))
    assert len(images(tiny_imagenet, "val")) == 6 and len(os.listdir(tiny_imagenet / "test_unlabelled")) == 3
    assert not (tiny_imagenet / rd.PROGRESS).exists() and not (tiny_imagenet / rd.STAGING).exists()


def test_in_place(tiny_imagenet):
    summary = rd.restructure(tiny_imagenet, in_place=True)
    assert summary.transfer == "move"
    assert len(images(tiny_imagenet, "train")) == 18
    assert not (tiny_imagenet / "train" / "n001" / "images").exists()
    # whole class folders were renamed; annotations and stray files are kept apart
    assert (tiny_imagenet / "train_annotations" / "n001" / "n001_boxes.txt").is_file()
    assert (tiny_imagenet / "train_annotations" / ".DS_Store").is_file()
    assert sorted(os.listdir(tiny_imagenet / "train")) == ["n001", "n002", "n003"]
    assert len(images(tiny_imagenet, "val")) == 6
    assert sorted(p.name for p in (tiny_imagenet / "test_unlabelled").iterdir()) == [
        "test_0.JPEG", "test_1.JPEG", "test_2.JPEG"]
    assert rd.restructure(tiny_imagenet, in_place=True).already_complete


def test_holdout_deterministic_and_disjoint(tiny_imagenet, tmp_path):
    rd.restructure(tiny_imagenet, output=tmp_path / "a", holdout=2, seed=7)
    rd.restructure(tiny_imagenet, output=tmp_path / "b", holdout=2, seed=7)
    rd.restructure(tiny_imagenet, output=tmp_path / "c", holdout=2, seed=8)
    a_test, a_train = images(tmp_path / "a", "test"), images(tmp_path / "a", "train")
    assert a_test == images(tmp_path / "b", "test")
    assert a_test != images(tmp_path / "c", "test")
    assert len(a_test) == 6 and all(len([p for p in a_test if p.startswith(w)]) == 2 for w in ("n001", "n002", "n003"))
    assert not set(a_test) & set(a_train) and len(a_train) == 12


def test_classes_keeps_first_wnids(tiny_imagenet, tmp_path):
    summary = rd.restructure(tiny_imagenet, output=tmp_path / "out", classes=2)
    assert summary.classes == 2 and summary.images["train"] == 12 and summary.images["val"] == 4
    assert summary.excluded_images == 8
    assert sorted(os.listdir(tmp_path / "out" / "train")) == ["n001", "n002"]
    with pytest.raises(ValueError, match="needs output"):
        rd.restructure(tiny_imagenet, in_place=True, classes=2)


def test_dry_run_changes_nothing(tiny_imagenet, capsys):
    before = tree(tiny_imagenet)
    summary = rd.restructure(tiny_imagenet, in_place=True, dry_run=True)
    assert summary.images["train"] == 18
    assert tree(tiny_imagenet) == before
    assert "train/n001/images -> train.restructuring/n001" in capsys.readouterr().out


def _append_row(root, row):
    with open(root / "val" / "val_annotations.txt", "a") as handle:
        handle.write(row)


def _rewrite_rows(root, old, new):
    path = root / "val" / "val_annotations.txt"
    path.write_text(path.read_text().replace(old, new))


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda r: _append_row(r, "val_99.JPEG\tn001\t0\t0\t1\t1\n"), r"val_annotations.txt:7: .*val_99.JPEG is missing"),
        (lambda r: _rewrite_rows(r, "n001", "n999"), r"val_annotations.txt:1: wnid 'n999' of val_0.JPEG is not in wnids.txt"),
        (lambda r: _append_row(r, "val_1.JPEG\tn002\t0\t0\t1\t1\n"), r"duplicate row for val_1.JPEG \(first at line 2\)"),
        (lambda r: _append_row(r, "../wnids.txt\tn001\t0\t0\t1\t1\n"), r"'../wnids.txt' is not a plain file name"),
        (lambda r: _append_row(r, "/etc/passwd\tn001\t0\t0\t1\t1\n"), r"'/etc/passwd' is not a plain file name"),
        (lambda r: (r / "train" / "n777" / "images").mkdir(parents=True), r"train/n777: wnid 'n777' is not in wnids.txt"),
        (lambda r: (r / "wnids.txt").unlink(), r"wnids.txt is missing"),
    ],
)
@pytest.mark.parametrize("in_place", [False, True])
def test_validation_errors_change_nothing(tiny_imagenet, tmp_path, corrupt, message, in_place):
    corrupt(tiny_imagenet)
    before = tree(tiny_imagenet)
    out = None if in_place else tmp_path / "out"
    with pytest.raises(rd.LayoutError, match=message):
        rd.restructure(tiny_imagenet, output=out, in_place=in_place)
    assert tree(tiny_imagenet) == before
    assert in_place or not (tmp_path / "out").exists()


def test_all_problems_reported_at_once(tiny_imagenet):
    _rewrite_rows(tiny_imagenet, "n002", "n404")
    _append_row(tiny_imagenet, "val_98.JPEG\tn001\t0\t0\t1\t1\n")
    with pytest.raises(rd.LayoutError) as error:
        rd.restructure(tiny_imagenet, in_place=True)
    assert "3 problem(s)" in str(error.value) and "val_98.JPEG" in str(error.value) and "n404" in str(error.value)


def test_stray_files_skipped_and_counted(tiny_imagenet, tmp_path):
    (tiny_imagenet / "train" / "n001" / "images" / ".DS_Store").write_bytes(b"\0")
    (tiny_imagenet / "train" / "n001" / "images" / "notes.txt").write_text("x")
    write_jpeg(tiny_imagenet / "val" / "images" / "unlisted.JPEG", 1)
    summary = rd.restructure(tiny_imagenet, output=tmp_path / "out")
    assert summary.stray_files == 5 + 3
    found = [p.name for p in (tmp_path / "out").rglob("*")]
    assert ".DS_Store" not in found and "notes.txt" not in found and "unlisted.JPEG" not in found


def test_too_large_holdout_is_an_error(tiny_imagenet, tmp_path):
    with pytest.raises(rd.LayoutError, match="too few to hold out 6"):
        rd.restructure(tiny_imagenet, output=tmp_path / "out", holdout=6)


def test_cli(tiny_imagenet, tmp_path, capsys):
    assert rd.main([str(tiny_imagenet), "--output", str(tmp_path / "out"), "--holdout", "1"]) == 0
    assert "3 classes; images: train 15, val 6, test 3, test_unlabelled 3" in capsys.readouterr().out
    assert rd.main([str(tmp_path / "missing"), "--in-place"]) == 2
    with pytest.raises(SystemExit):
        rd.main([str(tiny_imagenet)])  # neither --output nor --in-place


def test_runs_as_a_file_from_any_folder(tiny_imagenet, tmp_path):
    """``python helpers/restructure_dataset.py`` (the seed's way of running it) works outside the repository."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "helpers" / "restructure_dataset.py"
    done = subprocess.run([sys.executable, str(script), str(tiny_imagenet), "--output", str(tmp_path / "out"),
                           "--holdout", "1"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "out" / "test").iterdir()) == ["n001", "n002", "n003"]


def test_held_out_copies_of_training_images_are_left_out(tiny_imagenet, tmp_path, capsys):
    train = tiny_imagenet / "train"
    original = train / "n001" / "images" / "n001_0.JPEG"
    for path in (train / "n002" / "images").glob("*.JPEG"):  # a class of copies: whatever is held out, it trains
        path.write_bytes(original.read_bytes())
    (tiny_imagenet / "val" / "images" / "val_1.JPEG").write_bytes(original.read_bytes())  # val_1 is n002's
    out = tmp_path / "out"
    assert rd.main([str(tiny_imagenet), "--output", str(out), "--holdout", "1"]) == 0
    printed = capsys.readouterr().out
    assert "left out of its split: val/images/val_1.JPEG (the same bytes as train/" in printed
    assert not (out / "val" / "n002" / "val_1.JPEG").exists()
    trained = {p.read_bytes() for p in (out / "train").rglob("*.JPEG")}
    held = [p for split in ("val", "test") for p in (out / split).rglob("*.JPEG")]
    assert held and not any(p.read_bytes() in trained for p in held)
    summary = rd.restructure(tiny_imagenet, output=out, holdout=1)  # a second run: the same, left alone
    assert summary.already_complete and len(summary.copies_left_out) >= 2
    counts = {split: len(list((out / split).rglob("*.JPEG"))) for split in ("train", "val", "test")}
    assert counts == {split: summary.images[split] for split in counts}
