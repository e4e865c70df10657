"""metrics/evaluate.json: balanced accuracy, the most confused pairs, the TTA keys, and the shape
`dvc metrics diff` compares."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from twophase.metrics import HEADLINE, confusion, most_confused, score, side_by_side

NAMES = [f"c{i}" for i in range(6)]


def _random(seed: int, classes: int = 5, rows: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Labels of `classes` of the six classes (c5 never occurs) and noisy predictions, some c5."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, size=rows)
    guess = rng.integers(0, 6, size=rows)
    return labels, np.where(rng.random(rows) < 0.5, labels, guess)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_balanced_accuracy_equals_scikit_learns(seed: int) -> None:
    from sklearn.metrics import balanced_accuracy_score

    labels, predicted = _random(seed)
    with warnings.catch_warnings():  # "y_pred contains classes not in y_true": c5, by design
        warnings.simplefilter("ignore", UserWarning)
        expected = balanced_accuracy_score(labels, predicted)
    scores = score(labels, predicted, NAMES)
    assert scores["balanced_accuracy"] == round(float(expected), 6)
    recalls = [row["recall"] for row in scores["per_class"] if row["support"]]
    assert scores["balanced_accuracy"] == pytest.approx(np.mean(recalls), abs=1e-6)
    # recall_macro also averages the class the test split lacks, as a recall of 0
    assert scores["recall_macro"] == pytest.approx(np.mean(recalls) * 5 / 6, abs=1e-6)


def test_balanced_accuracy_weighs_every_class_alike() -> None:
    labels = np.array([0] * 8 + [1] * 2)
    predicted = np.zeros(10, dtype=int)  # all the majority class: 80 % accurate
    scores = score(labels, predicted, ["a", "b"])
    assert scores["accuracy"] == 0.8
    assert scores["balanced_accuracy"] == 0.5  # (8/8 + 0/2) / 2


def test_most_confused_are_the_top_off_diagonal_counts_by_hand() -> None:
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 0])
    predicted = np.array([1, 1, 2, 0, 1, 0, 0, 0, 2, 0])
    # mistakes: a->b twice, a->c once, b->a once, c->a three times
    pairs = most_confused(confusion(labels, predicted, 3), ["a", "b", "c"], k=3)
    assert pairs == {"c -> a": 3, "a -> b": 2, "a -> c": 1}
    assert list(pairs) == ["c -> a", "a -> b", "a -> c"], "most frequent first"
    assert score(labels, predicted, ["a", "b", "c"])["most_confused"] == {
        "c -> a": 3,
        "a -> b": 2,
        "a -> c": 1,
        "b -> a": 1,
    }
    assert most_confused(confusion(labels, labels, 3), ["a", "b", "c"]) == {}, "no mistake"


def test_side_by_side_keeps_the_plain_keys_and_adds_the_tta_ones() -> None:
    first, second = (score(*_random(seed), NAMES) for seed in (0, 1))
    plain = side_by_side(first, second, 200)
    assert list(plain) == ["test_images", "transfer", "finetune", "delta", "most_confused"]
    assert list(plain["transfer"]) == list(HEADLINE)
    assert HEADLINE[:4] == ("accuracy", "precision_macro", "recall_macro", "f1_macro")
    assert plain["most_confused"] == {
        "transfer": first["most_confused"],
        "finetune": second["most_confused"],
    }
    both = side_by_side(first, second, 200, (second, first))
    assert {k: both[k] for k in ("test_images", "transfer", "finetune", "delta")} == {
        k: plain[k] for k in ("test_images", "transfer", "finetune", "delta")
    }
    assert both["transfer_tta"] == plain["finetune"] and both["finetune_tta"] == plain["transfer"]
    assert both["delta_tta"] == {k: round(-v, 6) for k, v in plain["delta"].items()}
    assert list(both["most_confused"]) == ["transfer", "finetune", "transfer_tta", "finetune_tta"]


@pytest.mark.e2e
def test_dvc_metrics_diff_shows_the_new_keys(tmp_path: Path) -> None:
    """DVC flattens dicts into dotted keys and shows no list: each pair must be a key."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"

    def run(*args: str) -> str:
        done = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    metrics = tmp_path / "metrics" / "evaluate.json"
    metrics.parent.mkdir()
    first, second = (score(*_random(seed), NAMES) for seed in (0, 1))
    metrics.write_text(json.dumps(side_by_side(first, first, 200)))
    (tmp_path / "dvc.yaml").write_text("metrics:\n  - metrics/evaluate.json\n")
    run("git", "init", "-q")
    run("dvc", "init", "-q")
    run("git", "add", "-A")
    run("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "plain")
    metrics.write_text(json.dumps(side_by_side(first, second, 200, (second, second))))
    diff = json.loads(run("dvc", "metrics", "diff", "--json"))["metrics/evaluate.json"]
    pair, count = next(iter(second["most_confused"].items()))
    assert diff[f"most_confused.finetune.{pair}"]["new"] == count
    assert diff["finetune_tta.balanced_accuracy"]["new"] == second["balanced_accuracy"]
    assert diff["finetune_tta.balanced_accuracy"]["old"] is None
    assert "finetune.balanced_accuracy" in diff
