"""Test-set scores of a phase, and the two phases side by side (with and without test-time
augmentation)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

HEADLINE = ("accuracy", "precision_macro", "recall_macro", "f1_macro", "balanced_accuracy")
MOST_CONFUSED = 5  # pairs per phase in metrics/evaluate.json


TRAINED_BLOCKS = "trained_blocks.json"  # evaluate's record of what each phase trained


def _rounded(value: float) -> float:
    return round(float(value), 6)


def score(labels: np.ndarray, predicted: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro precision/recall/F1, balanced accuracy, per-class metrics and the most
    confused pairs of one phase.

    The formulas of scikit-learn's `precision_recall_fscore_support(zero_division=0)` and
    `balanced_accuracy_score` (tests compare them), in numpy: evaluate does not import
    sklearn.metrics (bench/RESULTS.md). Balanced accuracy is the mean recall over the classes
    the test split holds; `recall_macro` also averages in a class with no test image, as 0.
    """
    matrix = confusion(labels, predicted, len(class_names)).astype(np.float64)
    true_positives = np.diag(matrix)
    support = matrix.sum(axis=1)
    predicted_count = matrix.sum(axis=0)
    precision = _divide(true_positives, predicted_count)
    recall = _divide(true_positives, support)
    f1 = _divide(
        2 * true_positives,
        2 * true_positives + (predicted_count - true_positives) + (support - true_positives),
    )
    return {
        "accuracy": _rounded(np.mean(labels == predicted)),
        "precision_macro": _rounded(np.mean(precision)),
        "recall_macro": _rounded(np.mean(recall)),
        "f1_macro": _rounded(np.mean(f1)),
        "balanced_accuracy": _rounded(np.mean(recall[support > 0])),
        "most_confused": most_confused(matrix.astype(np.int64), class_names),
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
    transfer: dict[str, Any],
    finetune: dict[str, Any],
    test_images: int,
    tta: tuple[dict[str, Any], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The headline metrics of both phases under the same keys, and phase 2 minus phase 1; given
    `tta` (both phases' scores with test-time augmentation), the same under `*_tta` keys. Then
    each phase's most confused pairs, as {"<true> -> <predicted>": count} (a dict, which
    `dvc metrics diff` compares key by key; it shows no list)."""
    phases = {"transfer": transfer, "finetune": finetune}
    summary: dict[str, Any] = {"test_images": test_images, **_compared(transfer, finetune, "")}
    if tta is not None:
        summary |= _compared(*tta, "_tta")
        phases |= {"transfer_tta": tta[0], "finetune_tta": tta[1]}
    summary["most_confused"] = {phase: scores["most_confused"] for phase, scores in phases.items()}
    return summary


def _compared(transfer: dict[str, Any], finetune: dict[str, Any], suffix: str) -> dict[str, Any]:
    return {
        f"transfer{suffix}": {k: transfer[k] for k in HEADLINE},
        f"finetune{suffix}": {k: finetune[k] for k in HEADLINE},
        f"delta{suffix}": {k: _rounded(finetune[k] - transfer[k]) for k in HEADLINE},
    }


def _divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, 0 where the denominator is 0 (sklearn's zero_division=0)."""
    quotient: np.ndarray = np.divide(
        numerator, denominator, out=np.zeros_like(numerator), where=denominator != 0
    )
    return quotient


def confusion(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows: true class, columns: predicted class (sklearn's confusion_matrix layout)."""
    pairs = np.asarray(labels, dtype=np.int64) * num_classes + np.asarray(predicted, dtype=np.int64)
    counts: np.ndarray = np.bincount(pairs, minlength=num_classes**2)
    return counts.reshape(num_classes, num_classes)


def most_confused(
    matrix: np.ndarray, class_names: Sequence[str], k: int = MOST_CONFUSED
) -> dict[str, int]:
    """The k most frequent mistakes as {"<true> -> <predicted>": count}, most frequent first."""
    return {
        f"{true} -> {pred}": count for true, pred, count in top_confusions(matrix, class_names, k)
    }


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
