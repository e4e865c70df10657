"""Optimizers and learning-rate schedules, chosen by params (defaults: Adam at a constant LR).

The schedule is per epoch, so the LR of each epoch is one number in the history and the plots.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from twophase.params import PhaseParams

ONECYCLE_START, ONECYCLE_END = 1 / 25, 1 / 1e4  # as torch's OneCycleLR (div_factor, final)


@dataclass(frozen=True)
class Recipe:
    """How one phase optimises: everything but the parameters themselves."""

    lr: float
    optimizer: str = "adam"
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: str = "constant"
    warmup_epochs: int = 0
    label_smoothing: float = 0.0


def recipe_of(phase: PhaseParams) -> Recipe:
    return Recipe(
        lr=phase.lr,
        optimizer=phase.optimizer,
        momentum=phase.momentum,
        nesterov=phase.nesterov,
        weight_decay=phase.weight_decay,
        schedule=phase.schedule,
        warmup_epochs=phase.warmup_epochs,
        label_smoothing=phase.label_smoothing,
    )


def make_optimizer(
    groups: list[list[nn.Parameter]], recipe: Recipe, lr_scales: list[float] | None = None
) -> torch.optim.Optimizer:
    """One parameter group per list, each at `recipe.lr` times its scale (discriminative LRs)."""
    scales = lr_scales or [1.0] * len(groups)
    param_groups = [
        {"params": params, "lr": recipe.lr * scale, "scale": scale}
        for params, scale in zip(groups, scales, strict=True)
        if params
    ]
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(
            param_groups,
            lr=recipe.lr,
            momentum=recipe.momentum,
            nesterov=recipe.nesterov,
            weight_decay=recipe.weight_decay,
        )
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(param_groups, lr=recipe.lr, weight_decay=recipe.weight_decay)
    return torch.optim.Adam(param_groups, lr=recipe.lr, weight_decay=recipe.weight_decay)


def lr_factor(epoch: int, epochs: int, schedule: str, warmup_epochs: int = 0) -> float:
    """The LR multiplier of 0-based `epoch` out of `epochs`.

    Warm-up rises linearly to 1 over `warmup_epochs`; then `constant` stays at 1, `cosine`
    anneals to 0 at the end, `onecycle` (warm-up of 30 % of the epochs unless given) rises from
    1/25 and anneals to 1/1e4, like torch's OneCycleLR but per epoch.
    """
    if schedule == "onecycle":
        warm = warmup_epochs or max(1, round(0.3 * epochs))
        if epoch < warm:
            return ONECYCLE_START + (1 - ONECYCLE_START) * epoch / warm
        progress = (epoch - warm) / max(1, epochs - warm)
        return ONECYCLE_END + (1 - ONECYCLE_END) * 0.5 * (1 + math.cos(math.pi * progress))
    if epoch < warmup_epochs:
        return (epoch + 1) / (warmup_epochs + 1)
    if schedule == "cosine":
        progress = (epoch - warmup_epochs) / max(1, epochs - warmup_epochs)
        return 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0


def set_epoch_lr(
    optimizer: torch.optim.Optimizer, recipe: Recipe, epoch: int, epochs: int
) -> float:
    """Set every group's LR for `epoch`; return the base LR (the head's) of that epoch."""
    factor = lr_factor(epoch, epochs, recipe.schedule, recipe.warmup_epochs)
    for group in optimizer.param_groups:
        group["lr"] = recipe.lr * group["scale"] * factor
    return recipe.lr * factor
