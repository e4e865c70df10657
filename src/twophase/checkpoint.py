"""Checkpoints: a dict with the whole network's weights and everything needed to rebuild it."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from twophase.io import atomic_path
from twophase.model import Network, Preprocessing, full_network
from twophase.params import Params, to_dict
from twophase.train import FitResult


def save_checkpoint(
    state: dict[str, torch.Tensor],
    frozen: tuple[str, ...],
    path: Path,
    *,
    phase: str,
    params: Params,
    class_names: list[str],
    prep: Preprocessing,
    result: FitResult,
    last_epoch: int,
) -> None:
    """`state` is a whole `Network` state dict (backbone blocks and head)."""
    checkpoint = {
        "phase": phase,
        "model": state,
        "frozen": list(frozen),
        "arch": params.model.arch,
        "dense_units": list(params.model.dense_units),
        "dropout": params.model.dropout,
        "image_size": params.data.image_size,
        "preprocessing": asdict(prep),
        "class_names": class_names,
        "best_epoch": result.best_epoch,
        "best_val_loss": result.best_val_loss,
        "best_val_acc": result.best_val_acc,
        "last_epoch": last_epoch,
        "params": to_dict(params),
    }
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)


def load_checkpoint(path: Path) -> tuple[Network, dict[str, Any]]:
    """A saved network, ready for inference or more training, and its metadata."""
    checkpoint: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    network = full_network(
        checkpoint["arch"],
        "none",
        checkpoint["dense_units"],
        checkpoint["dropout"],
        len(checkpoint["class_names"]),
        frozen=tuple(checkpoint["frozen"]),
    )
    network.load_state_dict(checkpoint["model"])
    return network, checkpoint


def first_trainable_block(checkpoint: dict[str, Any], network: Network) -> str | None:
    """Where the checkpoint's frozen part ends (None: every block is frozen)."""
    return next((name for name in network.blocks if name not in checkpoint["frozen"]), None)
