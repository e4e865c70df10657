"""Figures people would rather look at than read: curves, confusion matrices, prediction grids.

One function per kind of figure; each phase calls the same one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from PIL import Image, ImageOps

from twophase.decode import load_rgb
from twophase.io import atomic_path

GRID_CELL_PX, GRID_CAPTION_PX, GRID_GAP_PX = 200, 44, 8  # an image, the two lines above it
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
    `confidence` (the predicted class's probability) is shown when given.

    The images are pasted into one mosaic drawn on one set of axes: matplotlib spends most of a
    figure's time per axes.
    """
    count = len(paths)
    rows = max(1, -(-count // columns))
    cell, caption = GRID_CELL_PX, GRID_CAPTION_PX
    room = cell - 2 * GRID_GAP_PX
    mosaic = Image.new("RGB", (columns * cell, rows * (cell + caption)), "white")
    fig = Figure(figsize=(3 * columns, 3.3 * rows))
    ax = fig.add_axes((0.0, 0.0, 1.0, 0.94))
    ax.axis("off")
    shown = confidence if confidence is not None else [None] * count
    for position, (image_path, true, predicted, probability) in enumerate(
        zip(paths, true_names, predicted_names, shown, strict=False)
    ):
        image = load_rgb(image_path, min_side=cell)
        smaller = image.width < room and image.height < room
        resample = Image.Resampling.NEAREST if smaller else Image.Resampling.LANCZOS
        image = ImageOps.contain(image, (room, room), resample)
        row, column = divmod(position, columns)
        left = column * cell + (cell - image.width) // 2
        top = row * (cell + caption) + caption + (cell - image.height) // 2
        mosaic.paste(image, (left, top))
        sure = f" ({probability:.0%})" if probability is not None else ""
        ax.text(
            column * cell + cell / 2,
            row * (cell + caption) + caption - 4,
            f"true: {true}\npred: {predicted}{sure}",
            color="green" if true == predicted else "red",
            fontsize=9,
            ha="center",
            va="bottom",
        )
    ax.imshow(np.asarray(mosaic), interpolation="antialiased")
    fig.suptitle(title)
    _save(fig, path)
