"""Test-set scores of a phase, and the two phases side by side."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

HEADLINE = ("accuracy", "precision_macro", "recall_macro", "f1_macro")


def _rounded(value: float) -> float:
    return round(float(value), 6)


def score(labels: np.ndarray, predicted: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro precision/recall/F1 and per-class metrics of one phase."""
    from sklearn.metrics import precision_recall_fscore_support  # slow import: only when scoring

    every_class = list(range(len(class_names)))
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predicted, labels=every_class, zero_division=0
    )
    return {
        "accuracy": _rounded(np.mean(labels == predicted)),
        "precision_macro": _rounded(np.mean(precision)),
        "recall_macro": _rounded(np.mean(recall)),
        "f1_macro": _rounded(np.mean(f1)),
        "per_class": [
            {
                "class": name,
                "precision": _rounded(precision[i]),
                "recall": _rounded(recall[i]),
                "f1": _rounded(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(class_names)
        ],
    }


def side_by_side(
    transfer: dict[str, Any], finetune: dict[str, Any], test_images: int
) -> dict[str, Any]:
    """The headline metrics of both phases under the same keys, and phase 2 minus phase 1."""
    return {
        "test_images": test_images,
        "transfer": {k: transfer[k] for k in HEADLINE},
        "finetune": {k: finetune[k] for k in HEADLINE},
        "delta": {k: _rounded(finetune[k] - transfer[k]) for k in HEADLINE},
    }


def confusion(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    from sklearn.metrics import confusion_matrix

    matrix: np.ndarray = confusion_matrix(labels, predicted, labels=list(range(num_classes)))
    return matrix


def top_confusions(
    matrix: np.ndarray, class_names: Sequence[str], k: int = 5
) -> list[tuple[str, str, int]]:
    """The k most frequent (true, predicted) mistakes."""
    off_diagonal = matrix.copy()
    np.fill_diagonal(off_diagonal, 0)
    flat = np.argsort(-off_diagonal, axis=None, kind="stable")[:k]
    pairs = []
    for position in flat:
        true, pred = np.unravel_index(position, matrix.shape)
        if off_diagonal[true, pred] > 0:
            pairs.append((class_names[true], class_names[pred], int(off_diagonal[true, pred])))
    return pairs
