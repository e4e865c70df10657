"""The evaluate stage: both checkpoints on the test split, scored the same way.

It writes numbers and predictions only; the report stage draws them (confusion matrices,
prediction grids), so a change to a picture never reruns a network.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
from torch import nn

from twophase import cache
from twophase.backbones import block_names, describe
from twophase.batches import array_batches
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
) -> dict[str, Any]:
    """Score each phase's checkpoint on the cached test inputs; write metrics and predictions."""
    device = resolve_device(params.device)
    amp = autocast_dtype(device, params.precision)
    test_embeddings, test_labels = cache.load_embeddings(embeddings_dir, "test")
    test_activations, _ = cache.load_activations(activations_dir, "test")
    activations_meta = cache.load_meta(activations_dir)
    test_rows = split[split["subset"] == "test"].reset_index(drop=True)
    scores: dict[str, dict[str, Any]] = {}
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
        probs, labels = predict(
            cached_input_model(network, checkpoint),
            array_batches(inputs, test_labels, params.finetune.batch_size, nhwc=nhwc),
            device,
            amp,
        )
        confidence, predicted_t = probs.max(dim=1)
        predicted, truth = predicted_t.numpy(), labels.numpy()
        scores[phase] = score(truth, predicted, names)
        per_class += [{"phase": phase, **row} for row in scores[phase]["per_class"]]
        predictions[phase] = pd.DataFrame(
            {
                "path": test_rows["path"],
                "actual": [names[i] for i in truth],
                "predicted": [names[i] for i in predicted],
                "probability": confidence.numpy().round(6),
            }
        )
    # written once every phase is scored: a failure leaves the last run's files as they were
    for phase, table in predictions.items():
        write_csv(table, plots_dir / f"predictions_{phase}.csv")
    write_csv(pd.DataFrame(per_class), plots_dir / "per_class.csv")
    write_json(trained, plots_dir / TRAINED_BLOCKS)
    summary = side_by_side(scores["transfer"], scores["finetune"], len(test_rows))
    write_json(summary, metrics_path)
    return summary
