"""The evaluate stage: both checkpoints on the test split, scored the same way.

It writes numbers and predictions only; the report stage draws them (confusion matrices,
prediction grids), so a change to a picture never reruns a network. With `evaluate.tta: flip`
each phase is also scored on the mean of its probabilities for the plain and the mirrored
test images, both read from the cache, and its predictions are written a second time as
`predictions_<phase>_tta.csv`; `predictions_<phase>.csv` and `per_class.csv` stay the plain ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from twophase import cache, tta
from twophase.backbones import block_names, describe
from twophase.batches import array_batches
from twophase.cache import FeatureCacheError
from twophase.checkpoint import load_checkpoint
from twophase.io import write_csv, write_json
from twophase.metrics import TRAINED_BLOCKS, score, side_by_side
from twophase.network import cached_input_model, predict
from twophase.params import Params
from twophase.runtime import autocast_dtype, resolve_device


def trained_blocks(network: nn.Module, checkpoint: dict[str, Any]) -> list[str]:
    """The blocks a checkpoint's phase trained, in the model's own names: none for a head on
    the embeddings, every block when the cut is the input."""
    if checkpoint["reads"] == "embeddings":
        return []
    blocks = block_names(network, describe(network, checkpoint["arch"]))
    cut = checkpoint["cut"]
    return blocks if cut is None else blocks[blocks.index(cut) :]


def evaluate(
    params: Params,
    embeddings_dir: Path,
    activations_dir: Path,
    split: pd.DataFrame,
    checkpoints: dict[str, Path],
    metrics_path: Path,
    plots_dir: Path,
    tta_dir: Path | None = None,
) -> dict[str, Any]:
    """Score each phase's checkpoint on the cached test inputs (and, with `evaluate.tta`, on
    their mirrors cached in `tta_dir`); write metrics and predictions."""
    device = resolve_device(params.device)
    amp = autocast_dtype(device, params.precision)
    test_embeddings, test_labels = cache.load_embeddings(embeddings_dir, "test")
    test_activations, _ = cache.load_activations(activations_dir, "test")
    activations_meta = cache.load_meta(activations_dir)
    flipped = _flipped_inputs(params.evaluate.tta, tta_dir, len(test_labels))
    test_rows = split[split["subset"] == "test"].reset_index(drop=True)
    scores: dict[str, dict[str, Any]] = {}
    tta_scores: dict[str, dict[str, Any]] = {}
    per_class = []
    predictions: dict[str, pd.DataFrame] = {}
    trained: dict[str, list[str]] = {}
    for phase, checkpoint_path in checkpoints.items():
        network, checkpoint = load_checkpoint(checkpoint_path)
        trained[phase] = trained_blocks(network, checkpoint)
        names: list[str] = checkpoint["class_names"]
        reads_activations = checkpoint["reads"] == "activations"
        inputs = test_activations if reads_activations else test_embeddings
        nhwc = reads_activations and activations_meta["layout"] == "nchw"
        model = cached_input_model(network, checkpoint)
        probs, labels = predict(
            model,
            array_batches(inputs, test_labels, params.finetune.batch_size, nhwc=nhwc),
            device,
            amp,
        )
        truth = labels.numpy()
        scores[phase] = score(truth, probs.max(dim=1).indices.numpy(), names)
        per_class += [{"phase": phase, **row} for row in scores[phase]["per_class"]]
        predictions[phase] = _predictions(test_rows, names, truth, probs)
        if flipped is not None:
            mirrored = flipped["activations" if reads_activations else "embeddings"]
            batches = array_batches(mirrored, test_labels, params.finetune.batch_size, nhwc=nhwc)
            mirrored_probs, _ = predict(model, batches, device, amp)
            averaged = tta.average([probs, mirrored_probs])
            tta_scores[phase] = score(truth, averaged.max(dim=1).indices.numpy(), names)
            predictions[f"{phase}_tta"] = _predictions(test_rows, names, truth, averaged)
    # written once every phase is scored: a failure leaves the last run's files as they were
    for phase, table in predictions.items():
        write_csv(table, plots_dir / f"predictions_{phase}.csv")
    write_csv(pd.DataFrame(per_class), plots_dir / "per_class.csv")
    write_json(trained, plots_dir / TRAINED_BLOCKS)
    with_tta = (tta_scores["transfer"], tta_scores["finetune"]) if tta_scores else None
    summary = side_by_side(scores["transfer"], scores["finetune"], len(test_rows), with_tta)
    write_json(summary, metrics_path)
    return summary


def _predictions(
    rows: pd.DataFrame, names: list[str], truth: np.ndarray, probs: torch.Tensor
) -> pd.DataFrame:
    """Each test image's path, class, predicted class and the probability given to it."""
    confidence, predicted = probs.max(dim=1)
    return pd.DataFrame(
        {
            "path": rows["path"],
            "actual": [names[i] for i in truth],
            "predicted": [names[i] for i in predicted.numpy()],
            "probability": confidence.numpy().round(6),
        }
    )


def _flipped_inputs(mode: str, tta_dir: Path | None, rows: int) -> dict[str, np.ndarray] | None:
    """The cached outputs on the mirrored test images (None without test-time augmentation),
    checked to be those of `mode` and of the test split's `rows` images."""
    if mode == "none":
        return None
    if tta_dir is None:
        raise ValueError(f"test-time augmentation {mode!r} needs the folder of its cache")
    held = cache.load_meta(tta_dir).get("tta") if (tta_dir / "meta.json").is_file() else None
    if held != mode:
        raise FeatureCacheError(
            f"evaluate.tta: {mode!r} needs the features stage's cache of the mirrored test "
            f"images, but {tta_dir}/ holds {held or 'nothing'!r}: run `dvc repro`, whose "
            "features stage writes it"
        )
    flipped = {
        kind: cache.load_flipped(tta_dir, "test", kind) for kind in ("embeddings", "activations")
    }
    if any(len(array) != rows for array in flipped.values()):
        raise FeatureCacheError(f"{tta_dir}/ does not match the test split: run `dvc repro`")
    return flipped
