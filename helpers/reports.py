"""Metrics and plots written after training and evaluation."""

import json
import logging
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from helpers import rundir  # noqa: E402

logger = logging.getLogger(__name__)

MAX_TICK_LABELS = 30  # a confusion matrix with more classes is drawn without names
ATTENTION_PANEL_PIXELS = 224  # an attention map's photo: square, as the encoder reads it


def classification_metrics(probabilities, labels, class_names, top_k=5):
    """Top-1, top-k and per-class accuracy, and the confusion matrix.

    Args:
        probabilities: ``(num_images, num_classes)`` float array of class scores.
        labels: ``(num_images,)`` int array, true class indices in ``[0, num_classes)``.
        class_names: ``num_classes`` names, in index order.
        top_k: k of the top-k accuracy (capped at ``num_classes``).

    Returns:
        A dict: ``top1`` and ``top5`` (fractions in [0, 1]; ``top5`` is the top-k
        accuracy), ``num_images``, ``per_class_accuracy`` (``{name: fraction}``,
        ``None`` for a class without images) and ``confusion_matrix``
        (``num_classes`` lists of counts, rows are true classes).
    """
    probabilities = np.asarray(probabilities)
    labels = np.asarray(labels, dtype=np.int64)
    num_classes = len(class_names)
    if probabilities.shape != (len(labels), num_classes):
        raise ValueError(
            f"Expected probabilities of shape {(len(labels), num_classes)}. "
            f"Received: {probabilities.shape}"
        )
    predicted = probabilities.argmax(axis=1)
    k = min(top_k, num_classes)
    top = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    per_class = {}
    for index, name in enumerate(class_names):
        total = confusion[index].sum()
        per_class[name] = float(confusion[index, index] / total) if total else None
    return {
        "top1": float((predicted == labels).mean()) if len(labels) else 0.0,
        "top5": float((top == labels[:, None]).any(axis=1).mean()) if len(labels) else 0.0,
        "top_k": k,
        "num_images": int(len(labels)),
        "per_class_accuracy": per_class,
        "confusion_matrix": confusion.tolist(),
    }


def write_json(path, data):
    """Writes ``data`` as indented JSON, atomically (``rundir.write_text``), and returns the path.

    Raises:
        helpers.errors.UsageError: the path cannot be written (named in the message).
    """
    rundir.write_text(path, json.dumps(data, indent=2) + "\n")
    return Path(path)


def plot_history(history, path, title):
    """Loss, accuracy and top-5 accuracy curves of one phase (train and validation).

    Args:
        history: ``{metric: [value per epoch]}``, e.g. from ``rundir.read_history``.
        path: the PNG to write.
        title: figure title.
    """
    panels = [("loss", "loss"), ("accuracy", "accuracy"), ("top5_accuracy", "top-5 accuracy")]
    panels = [(key, label) for key, label in panels if key in history]
    figure, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for axis, (key, label) in zip(axes[0], panels):
        epochs = np.arange(1, len(history[key]) + 1)
        axis.plot(epochs, history[key], marker="o", label="train")
        if f"val_{key}" in history:
            axis.plot(epochs, history[f"val_{key}"], marker="o", label="validation")
        axis.set_xlabel("epoch")
        axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def plot_timeline(rows, unit, class_names, path, title, classes=6):
    """An input's predictions over time (``helpers.timeline``): each window's probability of the
    classes that lead some window (at most ``classes``, the most often leading first), drawn at
    the window's centre, and a band along the top coloured, at each moment, by the leading class
    of the window whose centre is nearest.

    Args:
        rows: per window ``(start, end, probabilities (num_classes,))``, ``start``/``end`` in ``unit``.
        unit: ``"s"`` or ``"frames"`` (the x axis' label).
        class_names: names in index order.
        path: the PNG to write (aside, then renamed into place).
        title: figure title.
    """
    centres = np.array([(start + end) / 2 for start, end, _ in rows])
    scores = np.stack([p for _, _, p in rows])
    leaders = scores.argmax(axis=1)
    shown = [int(i) for i in np.argsort(-np.bincount(leaders, minlength=scores.shape[1]), kind="stable")
             if (leaders == i).any()][:classes]
    colours = {index: plt.cm.tab10(n % 10) for n, index in enumerate(shown)}
    figure, axis = plt.subplots(figsize=(9, 3.6))
    for index in shown:
        axis.plot(centres, scores[:, index], marker="o" if len(rows) < 40 else None, color=colours[index],
                  label=class_names[index])
    # The band: each moment coloured by the leading class of the window whose centre is nearest.
    edges = [rows[0][0], *((centres[1:] + centres[:-1]) / 2), rows[-1][1]]
    for left, right, leader in zip(edges[:-1], edges[1:], leaders):
        axis.axvspan(left, right, ymin=0.94, ymax=1.0, color=colours.get(int(leader), "0.6"), lw=0)
    axis.set_ylim(0, 1.08)
    axis.set_xlabel("time (s)" if unit == "s" else "frame")
    axis.set_ylabel("probability")
    axis.grid(alpha=0.3)
    axis.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small", title="leading class")
    axis.set_title(title)
    figure.tight_layout()
    rundir.write_atomically(path, lambda partial: figure.savefig(partial, dpi=100, format="png"))
    plt.close(figure)
    return path


def plot_confusion_matrix(confusion, class_names, path, title):
    """Row-normalised confusion matrix (rows: true class, columns: predicted)."""
    confusion = np.asarray(confusion, dtype=np.float64)
    rates = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    size = min(4 + 0.35 * len(class_names), 20)
    figure, axis = plt.subplots(figsize=(size, size))
    image = axis.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    if len(class_names) <= MAX_TICK_LABELS:
        ticks = np.arange(len(class_names))
        axis.set_xticks(ticks, class_names, rotation=90)
        axis.set_yticks(ticks, class_names)
    axis.set_xlabel("predicted class")
    axis.set_ylabel("true class")
    axis.set_title(title)
    figure.colorbar(image, ax=axis, fraction=0.046, pad=0.04)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def format_report(metrics, class_labels=None):
    """A short text report: the split, top-1, top-k and the weakest classes."""
    lines = [
        f"split: {metrics['split']} ({metrics['num_images']} samples"
        f"{', test-time flips' if metrics.get('tta') == 'flip' else ''})",
        f"top-1 accuracy: {100 * metrics['top1']:.2f}%",
    ]
    if "top5" in metrics:
        lines.append(f"top-{metrics['top_k']} accuracy: {100 * metrics['top5']:.2f}%")
    scored = [(acc, name) for name, acc in metrics["per_class_accuracy"].items() if acc is not None]
    if scored:
        lines.append("weakest classes: " + ", ".join(
            f"{(class_labels or {}).get(name, name)} {100 * acc:.0f}%" for acc, name in sorted(scored)[:5]
        ))
    return "\n".join(lines)


def save_evaluation(output_dir, metrics, model_path, display_names):
    """Writes ``metrics.json`` and ``confusion_matrix.png`` for a trained run and prints the report.

    Args:
        output_dir: the run's folder.
        metrics: from ``classification_metrics``, plus ``split``.
        model_path: the evaluated checkpoint (recorded as ``model``).
        display_names: class names to show, in index order.
    """
    run = rundir.RunDir(output_dir)
    metrics["model"] = str(model_path)
    plot_confusion_matrix(metrics["confusion_matrix"], display_names, run.confusion_matrix,
                          f"{metrics['split']}: top-1 {100 * metrics['top1']:.1f}%")
    write_json(run.metrics, metrics)
    names = dict(zip(metrics["per_class_accuracy"], display_names))
    print(format_report(metrics, names))
    print(f"outputs in {run.path}")


def top_k(probabilities, class_names, k):
    """The ``k`` most probable classes of one input, most probable first.

    Args:
        probabilities: ``(num_classes,)`` probabilities.
        class_names: the class names in index order.
        k: classes returned (capped at the number of classes).

    Returns:
        ``[(class_name, probability), ...]``, probabilities as Python floats in [0, 1].
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    return [(class_names[i], float(probabilities[i])) for i in np.argsort(-probabilities, kind="stable")[:k]]


def print_ranked(name, ranked, descriptions=None):
    """Prints ``name`` and its ranked ``(class_name, probability)`` pairs (``top_k``), one per line,
    each class with its description (``classes.json``'s ``descriptions``) when there is one."""
    descriptions = descriptions or {}
    print(name)
    for rank, (label, probability) in enumerate(ranked, 1):
        label += f" ({descriptions[label]})" if label in descriptions else ""
        print(f"  {rank}. {label}: {probability:.4f}")


def _attention_overlay(axis, image, weights, grid_shape):
    """The photo with one word's attention weights (``(positions,)``, the ``grid_shape`` grid
    flattened row by row) upsampled bilinearly to its size, as a heat map over it."""
    from PIL import Image

    heat = np.asarray(weights, np.float32).reshape(grid_shape)
    heat = heat / max(float(heat.max()), 1e-12)
    heat = np.asarray(Image.fromarray(heat).resize(image.size, Image.BILINEAR))
    axis.imshow(image)
    axis.imshow(heat, cmap="inferno", alpha=0.6, vmin=0, vmax=1)


def plot_attention(image_path, words, weights, grid_shape, path, columns=5, title=None):
    """One image's attention map: the photo with its caption, then one panel per word showing
    where the decoder looked while it produced that word (Xu et al. 2015, figure 3). The photo is
    shown as the encoder read it: upright, squared (``ATTENTION_PANEL_PIXELS``), so the heat map
    lies over what the model saw.

    Args:
        image_path: the image file.
        words: the caption's words, ``n`` strings.
        weights: ``(n, positions)`` attention weights, rows summing to 1 (``positions`` =
            ``rows * columns`` of ``grid_shape``).
        grid_shape: ``(rows, columns)`` of the feature grid (10 x 10 for Xception at 299 px).
        path: the PNG to write (atomically).
        columns: panels per row of the figure.
        title: the first panel's title (default: the caption).

    Raises:
        ValueError: ``weights`` does not have one row per word or one column per grid position.
    """
    import textwrap

    from PIL import Image

    from helpers import data

    weights = np.asarray(weights)
    if weights.shape != (len(words), grid_shape[0] * grid_shape[1]):
        raise ValueError(f"weights must be (words, positions) = ({len(words)}, {grid_shape[0] * grid_shape[1]}). "
                         f"Received: {weights.shape}")
    rows = -(-(len(words) + 1) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 2.9 * rows), squeeze=False)
    for axis in axes.ravel():
        axis.axis("off")
    # The photo as the model saw it: upright (EXIF), squared and resized as the encoder's input is
    # (helpers.data.read_rgb), so the grid lies where the model's grid lay, and a 1 x 5000 photo is
    # not a blank line.
    image = Image.fromarray(data.read_rgb(image_path, ATTENTION_PANEL_PIXELS).astype(np.uint8))
    axes[0, 0].imshow(image)
    axes[0, 0].set_title("\n".join(textwrap.wrap(title or " ".join(words), 28)[:3]), fontsize=8, loc="left")
    for axis, word, row in zip(axes.ravel()[1:], words, weights):
        _attention_overlay(axis, image, row, grid_shape)
        axis.set_title(word, fontsize=10)
    figure.tight_layout()
    rundir.write_atomically(path, lambda partial: figure.savefig(partial, dpi=72, format="png"))
    plt.close(figure)
    return path


def plot_captions(paths, generated, references, path, title, columns=4, attention=None):
    """A grid of images, each with its generated caption and one reference caption below it.

    Args:
        paths: image files (at most a dozen or so make a readable figure).
        generated, references: one caption string per image.
        path: the PNG to write.
        attention: optional, for an attention captioner: ``(grid_shape, [(image_path, words,
            weights), ...])`` as for ``plot_attention``; each image gets a row below the grid
            with its first ``columns`` words' attention maps.
    """
    import textwrap

    from PIL import Image

    maps = attention[1] if attention else []
    rows = max(1, -(-len(paths) // columns))
    # constrained layout keeps the title clear of the first row's captions, however tall the figure
    figure, axes = plt.subplots(rows + len(maps), columns, figsize=(4 * columns, 5.2 * rows + 4.2 * len(maps)),
                                squeeze=False, layout="constrained")
    for axis in axes.ravel():
        axis.axis("off")
    for axis, image_path, ours, reference in zip(axes[:rows].ravel(), paths, generated, references):
        with Image.open(image_path) as image:
            axis.imshow(image.convert("RGB"))
        axis.set_title("\n".join(textwrap.wrap(ours, 40)[:2]) + "\n" + "\n".join(
            textwrap.wrap(f"ref: {reference}", 40)[:2]), fontsize=9, loc="left")
    for row, (image_path, words, weights) in enumerate(maps, rows):
        with Image.open(image_path) as opened:
            image = opened.convert("RGB")
        for axis, word, weight in zip(axes[row], words, weights):
            _attention_overlay(axis, image, weight, attention[0])
            axis.set_title(f"attention: {word}", fontsize=10)
    figure.suptitle(title)
    rundir.write_atomically(path, lambda partial: figure.savefig(partial, dpi=80, format="png"))
    plt.close(figure)
    return path
