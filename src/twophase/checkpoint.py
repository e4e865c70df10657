"""Checkpoints: a dict with the whole network's weights under torchvision's own keys, and
everything needed to rebuild it, with or without twophase (docs: "Use the model").
"""

from __future__ import annotations

from itertools import chain
from pathlib import Path
from typing import Any

import torch
from torch import nn

from twophase.io import atomic_path
from twophase.model import Preprocessing, build_head, create_model
from twophase.params import Params, to_dict


def save_checkpoint(
    state: dict[str, torch.Tensor],
    path: Path,
    *,
    phase: str,
    params: Params,
    features_meta: dict[str, Any],
    reads: str,
    cut: str | None,
    summary: dict[str, Any],
) -> None:
    """`state` is the whole model's state dict, the head under the classifier's name.

    `reads` says what the checkpoint's trained part takes as input when scored on the cache:
    "embeddings" (phase 1: the head alone) or "activations" (phase 2: from block `cut` on).
    `summary`: the training's best_epoch, best_val_loss, best_val_acc and last_epoch.
    """
    arch = features_meta["arch"]
    checkpoint = {
        "phase": phase,
        "state_dict": state,
        "arch": arch,
        "model_kwargs": features_meta["model_kwargs"],
        "classifier": features_meta["classifier"],
        "head": {
            "in_features": features_meta["embedding_dim"],
            "dense_units": list(params.model.dense_units),
            "dropout": params.model.dropout,
            "num_classes": len(features_meta["class_names"]),
        },
        "reads": reads,
        "cut": cut,
        "image_size": features_meta["image_size"],
        "preprocessing": features_meta["preprocessing"],
        "class_names": features_meta["class_names"],
        "best_epoch": summary["best_epoch"],
        "best_val_loss": summary["best_val_loss"],
        "best_val_acc": summary["best_val_acc"],
        "last_epoch": summary["last_epoch"],
        "params": to_dict(params),
    }
    if features_meta.get("drop_path") is not None:  # phase 2's stochastic depth, when set
        checkpoint["drop_path"] = features_meta["drop_path"]
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)


def build_network(checkpoint: dict[str, Any]) -> nn.Module:
    """The checkpoint's model (torchvision or timm), untrained, the head as its classifier."""
    model = create_model(
        checkpoint["arch"], checkpoint["model_kwargs"], checkpoint.get("drop_path")
    )
    spec = checkpoint["head"]
    head = build_head(
        spec["in_features"], spec["dense_units"], spec["dropout"], spec["num_classes"]
    )
    model.set_submodule(checkpoint["classifier"], head)
    return model


def network_of(checkpoint: dict[str, Any], initialise: bool = False) -> nn.Module:
    """The checkpoint's network with its trained weights.

    Built on the meta device and then handed the checkpoint's tensors, so that no weight is
    initialised only to be replaced (bench/RESULTS.md, start-up costs). Built the ordinary way
    where that cannot work: a constructor that computes
    with tensor values (RegNet's widths), a buffer the checkpoint lacks (`persistent=False`), and
    with `initialise`, for training that continues from the checkpoint: initialising draws from
    the global RNG, so phase 2's dropout masks and batch order start where they always did.
    """
    state = checkpoint["state_dict"]
    model = None if initialise else _meta_network(checkpoint)
    if model is not None:
        model.load_state_dict(state, assign=True)
        if not any(tensor.is_meta for tensor in chain(model.parameters(), model.buffers())):
            return model
    model = build_network(checkpoint)
    model.load_state_dict(state)
    return model


def _meta_network(checkpoint: dict[str, Any]) -> nn.Module | None:
    try:
        with torch.device("meta"):
            return build_network(checkpoint)
    except (NotImplementedError, RuntimeError):
        return None


def load_checkpoint(
    path: Path, initialise: bool = False, drop_path: float | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """A saved network, ready for inference or (with `initialise`: see `network_of`) training.

    A `drop_path` replaces the checkpoint's own: phase 2 trains phase 1's network with the
    params' stochastic depth (model.drop_path), which phase 1, whose backbone never trains,
    does not depend on; the returned checkpoint records it."""
    checkpoint: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    if drop_path is not None:
        checkpoint["drop_path"] = drop_path
    return network_of(checkpoint, initialise), checkpoint


def preprocessing_of(checkpoint: dict[str, Any]) -> Preprocessing:
    """The checkpoint's preprocessing (the defaults where it stored none: untrained weights)."""
    return Preprocessing(**(checkpoint["preprocessing"] or {}))
