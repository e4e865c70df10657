"""The report stage: one Markdown page a reviewer reads in a pull request, and its pictures.

It draws what the evaluate stage wrote (no network here): curves from the histories, confusion
matrices and prediction grids from the predictions. Images are linked relatively, so the page
renders on GitHub next to the PNGs it names.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from twophase.io import atomic_path, read_json
from twophase.metrics import HEADLINE, TRAINED_BLOCKS, confusion, top_confusions
from twophase.params import Params, flatten, is_speed_only, to_dict
from twophase.plots import (
    PHASE_TITLES,
    grid_choice,
    plot_confusion,
    plot_curves,
    plot_prediction_grid,
)

PHASE_STAGES = {"transfer": "train_transfer", "finetune": "finetune"}
GRID_IMAGES = 8


def build_report(
    params: Params,
    metrics_dir: Path,
    plots_dir: Path,
    evaluate_dir: Path,
    report_path: Path,
    figures_dir: Path,
) -> str:
    histories = {
        phase: pd.read_csv(plots_dir / stage / "history.csv").to_dict("records")
        for phase, stage in PHASE_STAGES.items()
    }
    plot_curves(histories, "loss", figures_dir / "loss.png")
    plot_curves(histories, "acc", figures_dir / "accuracy.png")
    per_class = _read_per_class(evaluate_dir / "per_class.csv")
    evaluation = read_json(metrics_dir / "evaluate.json")
    training = {
        phase: read_json(metrics_dir / f"{stage}.json") for phase, stage in PHASE_STAGES.items()
    }

    def link(path: Path) -> str:
        return Path(os.path.relpath(path, report_path.parent)).as_posix()

    lines = [
        "# twophase report",
        "",
        f"{params.model.arch} ({params.model.weights}) on `{params.data.dataset}`, "
        f"{evaluation['test_images']} test images; {_phase_two(evaluate_dir, params)}.",
        "",
        *(
            ["**Phase 2 was skipped** (`finetune.epochs: 0`): its results are phase 1's.", ""]
            if training["finetune"].get("skipped")
            else []
        ),
        "## Test metrics",
        "",
        _table(
            ["metric", PHASE_TITLES["transfer"], PHASE_TITLES["finetune"], "delta (2 - 1)"],
            _metric_rows(evaluation, "")
            + (_metric_rows(evaluation, "_tta") if "transfer_tta" in evaluation else []),
        ),
        "",
        "## Training",
        "",
        _table(
            ["", PHASE_TITLES["transfer"], PHASE_TITLES["finetune"]],
            [
                [key.replace("_", " ")]
                + [str(training[phase].get(key, "")) for phase in PHASE_STAGES]
                for key in dict.fromkeys([*training["transfer"], *training["finetune"]])
            ],
        ),
        "",
        f"![loss curves]({link(figures_dir / 'loss.png')})",
        f"![accuracy curves]({link(figures_dir / 'accuracy.png')})",
        "",
        "## Params that differ from the defaults",
        "",
        _params_diff(to_dict(params), to_dict(Params())),
        "",
        "## Confusion",
        "",
    ]
    for phase in PHASE_STAGES:
        predictions = pd.read_csv(
            evaluate_dir / f"predictions_{phase}.csv",
            dtype={"path": str, "actual": str, "predicted": str},
            keep_default_na=False,  # class names and paths as written: a class may be `NA`
        )
        names = per_class.loc[per_class["phase"] == phase, "class"].tolist()
        matrix = _draw_phase(predictions, names, phase, figures_dir)
        lines += [
            f"### {PHASE_TITLES[phase]}",
            "",
            f"![confusion matrix, {PHASE_TITLES[phase]}]"
            f"({link(figures_dir / f'confusion_{phase}.png')})",
            "",
            "Most confused pairs:",
            "",
            _confused_pairs(matrix, names),
            "",
        ]
    lines += ["## Per class, worst first", ""]
    lines += [_per_class(evaluate_dir / "per_class.csv"), ""]
    lines += ["## Test predictions: the most confident errors, then a few correct", ""]
    lines += [
        f"![test predictions, {PHASE_TITLES[phase]}]({link(figures_dir / f'grid_{phase}.png')})"
        for phase in PHASE_STAGES
    ]
    text = "\n".join(lines) + "\n"
    with atomic_path(report_path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return text


def _metric_rows(evaluation: Mapping[str, Any], suffix: str) -> list[list[str]]:
    """The headline metrics of evaluate.json's `transfer`, `finetune` and `delta` (`suffix`
    "_tta": with test-time augmentation)."""
    label = " (TTA)" if suffix else ""
    return [
        [
            f"{name}{label}",
            f"{evaluation[f'transfer{suffix}'][name]:.4f}",
            f"{evaluation[f'finetune{suffix}'][name]:.4f}",
            f"{evaluation[f'delta{suffix}'][name]:+.4f}",
        ]
        for name in HEADLINE
    ]


def _phase_two(evaluate_dir: Path, params: Params) -> str:
    """What phase 2 trained, in the model's own block names (the param says only `1`)."""
    unfreeze = f"finetune.unfreeze: {', '.join(params.finetune.unfreeze)}"
    path = evaluate_dir / TRAINED_BLOCKS
    if not path.is_file():
        return f"phase 2 unfreezes {unfreeze}"
    blocks = read_json(path).get("finetune", [])
    if not blocks:
        return "phase 2 trained no block (the head on the embeddings)"
    return f"phase 2 trains {', '.join(f'`{b}`' for b in blocks)} and the head ({unfreeze})"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _params_diff(current: Mapping[str, Any], defaults: Mapping[str, Any]) -> str:
    now, before = flatten(dict(current)), flatten(dict(defaults))
    rows = [
        [f"`{key}`", f"`{now[key]}`", f"`{before.get(key)}`"]
        for key in now
        if now[key] != before.get(key) and not is_speed_only(key)
    ]
    if not rows:
        return "None: this run used the default params."
    return _table(["param", "value", "default"], rows)


def _read_per_class(path: Path) -> pd.DataFrame:
    """per_class.csv with its class names as written: neither `NA` nor `null` read as missing,
    nor `01` and `1` as the same number."""
    return pd.read_csv(path, dtype={"phase": str, "class": str}, keep_default_na=False)


def _per_class(path: Path) -> str:
    """Precision, recall, F1 and support of both phases per class, lowest phase-2 F1 first."""
    table = _read_per_class(path)
    wide = table.pivot(index="class", columns="phase", values=["precision", "recall", "f1"])
    support = table.groupby("class")["support"].first()
    order = wide[("f1", "finetune")].sort_values(kind="stable").index
    rows = [
        [f"`{name}`"]
        + [
            f"{wide.loc[name, (m, phase)]:.3f}"
            for m in ("precision", "recall", "f1")
            for phase in PHASE_STAGES
        ]
        + [str(support[name])]
        for name in order
    ]
    header = ["class"] + [f"{m} {n}" for m in ("precision", "recall", "F1") for n in ("1", "2")]
    return _table([*header, "support"], rows)


def _draw_phase(
    predictions: pd.DataFrame, names: list[str], phase: str, figures_dir: Path
) -> np.ndarray:
    """A phase's confusion matrix (returned) and its prediction grid, as PNGs."""
    position = {name: i for i, name in enumerate(names)}
    actual = predictions["actual"].map(position).to_numpy()
    predicted = predictions["predicted"].map(position).to_numpy()
    matrix = confusion(actual, predicted, len(names))
    title = PHASE_TITLES[phase]
    plot_confusion(
        matrix, names, f"confusion matrix, {title}", figures_dir / f"confusion_{phase}.png"
    )
    chosen = predictions.iloc[
        grid_choice(actual == predicted, predictions["probability"].to_numpy(), GRID_IMAGES)
    ]
    plot_prediction_grid(
        chosen["path"].tolist(),
        chosen["actual"].tolist(),
        chosen["predicted"].tolist(),
        f"test predictions, {title}: most confident errors, then correct",
        figures_dir / f"grid_{phase}.png",
        confidence=chosen["probability"].tolist(),
    )
    return matrix


def _confused_pairs(matrix: np.ndarray, names: list[str], k: int = 5) -> str:
    pairs = top_confusions(matrix, names, k)
    if not pairs:
        return "None: every test image was classified correctly."
    return _table(["true", "predicted as", "images"], [[t, p, str(n)] for t, p, n in pairs])
