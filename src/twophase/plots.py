"""Figures people would rather look at than read: curves, confusion matrices, prediction grids.

One function per kind of figure; each phase calls the same one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from twophase.decode import load_rgb
from twophase.io import atomic_path

PHASE_TITLES = {"transfer": "phase 1: transfer learning", "finetune": "phase 2: fine-tuning"}


def _save(fig: Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def plot_curves(
    histories: Mapping[str, Sequence[Mapping[str, float]]], metric: str, path: Path
) -> None:
    """train_<metric> and val_<metric> over epochs, phases one after the other."""
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    colors = {"train": "tab:blue", "val": "tab:orange"}
    styles = ["-", "--"]
    for (phase, rows), style in zip(histories.items(), styles, strict=False):
        if not rows:
            continue
        epochs = [row["epoch"] for row in rows]
        for subset, color in colors.items():
            values = [row[f"{subset}_{metric}"] for row in rows]
            ax.plot(
                epochs,
                values,
                style,
                color=color,
                marker="o",
                markersize=3,
                label=f"{subset} ({PHASE_TITLES.get(phase, phase)})",
            )
        if phase == "finetune":
            # phase 2's first row is its starting point: phase 1's weights, where phase 1 ended
            ax.axvline(epochs[0], color="grey", linewidth=1, linestyle=":")
    ax.set_xlabel("epoch")
    ax.set_ylabel({"loss": "cross-entropy loss", "acc": "accuracy"}.get(metric, metric))
    ax.set_title(f"{metric}: train and validation")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_confusion(matrix: np.ndarray, class_names: Sequence[str], title: str, path: Path) -> None:
    """Confusion matrix with the axes of DVC's confusion template on the same page: actual class
    on x, predicted on y; each actual class's column normalised, counts kept when few classes.

    `matrix[i, j]` counts images of actual class i predicted as j.
    """
    n = len(class_names)
    size = min(max(4.0, 0.28 * n + 2.5), 14.0)
    fig = Figure(figsize=(size, size))
    ax = fig.subplots()
    by_actual = matrix.T  # rows: predicted, columns: actual
    totals = by_actual.sum(axis=0, keepdims=True)
    shares = np.divide(
        by_actual, totals, out=np.zeros(by_actual.shape, dtype=float), where=totals > 0
    )
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), class_names, rotation=90, fontsize=7 if n > 20 else 9)
    ax.set_yticks(range(n), class_names, fontsize=7 if n > 20 else 9)
    ax.set_xlabel("actual")
    ax.set_ylabel("predicted")
    ax.set_title(title)
    if n <= 15:
        for (row, column), count in np.ndenumerate(by_actual):
            if count:
                ax.text(
                    column,
                    row,
                    str(count),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if shares[row, column] > 0.5 else "black",
                )
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the actual class")
    _save(fig, path)


def grid_choice(correct: np.ndarray, confidence: np.ndarray, count: int = 8) -> np.ndarray:
    """Rows for a prediction grid: the most confident errors first, then a few (at least 2,
    when there are any) of the most confident correct predictions. The same rule for every
    phase, so each grid shows that phase's worst mistakes."""
    order = np.argsort(-confidence, kind="stable")
    errors = [i for i in order if not correct[i]]
    right = [i for i in order if correct[i]]
    keep_right = min(len(right), max(2, count - len(errors)))
    chosen = errors[: count - keep_right] + right[:keep_right]
    return np.asarray(chosen[:count], dtype=np.int64)


def plot_prediction_grid(
    paths: Sequence[str],
    true_names: Sequence[str],
    predicted_names: Sequence[str],
    title: str,
    path: Path,
    columns: int = 4,
    confidence: Sequence[float] | None = None,
) -> None:
    """Test images with true and predicted class; green when right, red when wrong.
    `confidence` (the predicted class's probability) is shown when given."""
    count = len(paths)
    rows = max(1, -(-count // columns))
    fig = Figure(figsize=(3 * columns, 3.3 * rows))
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    shown = confidence if confidence is not None else [None] * count
    for ax, image_path, true, predicted, probability in zip(
        axes.flat, paths, true_names, predicted_names, shown, strict=False
    ):
        ax.imshow(load_rgb(image_path))
        color = "green" if true == predicted else "red"
        sure = f" ({probability:.0%})" if probability is not None else ""
        ax.set_title(f"true: {true}\npred: {predicted}{sure}", color=color, fontsize=9)
    fig.suptitle(title)
    _save(fig, path)
