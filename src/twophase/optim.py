"""Optimizers and learning-rate schedules, chosen by params (defaults: Adam at a constant LR).

The schedule is per epoch, so the LR of each epoch is one number in the history and the plots.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.optim.adam import adam
from torch.optim.sgd import sgd

from twophase.params import PhaseParams

ONECYCLE_START, ONECYCLE_END = 1 / 25, 1 / 1e4  # as torch's OneCycleLR (div_factor, final)
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8  # torch.optim.Adam's defaults


class Optimizer:
    """Adam, AdamW or SGD over parameter groups, stepping with the functional kernels that
    torch.optim's own classes call (`torch.optim.adam.adam`, `torch.optim.sgd.sgd`), with the
    same state, so every update is theirs bit for bit (tests/test_optim.py).

    Why not `torch.optim.Adam` itself: its constructor and its `step` import torch._dynamo, which
    takes longer than the whole phase-1 training on a Pet-sized cache (bench/RESULTS.md); the
    kernels do not. What the project needs of an optimizer is here: `param_groups` (LR per group,
    read by `set_epoch_lr` and by `torch.amp.GradScaler`), `zero_grad`, `step` and hooks run
    after each step (`register_step_post_hook`, named as torch.optim's: the weight EMA).
    """

    def __init__(self, param_groups: list[dict[str, Any]], phase: PhaseParams) -> None:
        if phase.optimizer not in ("adam", "adamw", "sgd"):
            raise ValueError(f"unknown optimizer {phase.optimizer!r}")
        self.phase = phase
        self.param_groups = param_groups
        self.state: dict[torch.Tensor, dict[str, Any]] = {}
        self.post_hooks: list[Callable[[], None]] = []

    def register_step_post_hook(self, hook: Callable[[], None]) -> None:
        """Call `hook()` after every step (not after a step GradScaler skips: no step is taken)."""
        self.post_hooks.append(hook)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for param in group["params"]:
                if set_to_none:
                    param.grad = None
                elif param.grad is not None:
                    param.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            params: list[torch.Tensor] = []
            grads: list[torch.Tensor] = []
            for param in group["params"]:
                if param.grad is not None:
                    params.append(param)
                    grads.append(param.grad)
            if self.phase.optimizer == "sgd":
                self._sgd_step(params, grads, group["lr"], group["weight_decay"])
            else:
                self._adam_step(params, grads, group["lr"], group["weight_decay"])
        for hook in self.post_hooks:
            hook()

    def _adam_step(
        self, params: list[torch.Tensor], grads: list[torch.Tensor], lr: float, decay: float
    ) -> None:
        for param in params:
            if param not in self.state:
                self.state[param] = {
                    "step": torch.tensor(0.0),  # on the CPU, float32, as torch.optim.Adam
                    "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format),
                }
        states = [self.state[p] for p in params]
        adam(
            params,
            grads,
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [],
            [s["step"] for s in states],
            decoupled_weight_decay=self.phase.optimizer == "adamw",
            amsgrad=False,
            beta1=ADAM_BETAS[0],
            beta2=ADAM_BETAS[1],
            lr=lr,
            weight_decay=decay,
            eps=ADAM_EPS,
            maximize=False,
        )

    def _sgd_step(
        self, params: list[torch.Tensor], grads: list[torch.Tensor], lr: float, decay: float
    ) -> None:
        momentum = self.phase.momentum
        buffers = [self.state.get(p, {}).get("momentum_buffer") for p in params]
        sgd(
            params,
            grads,
            buffers,
            weight_decay=decay,
            momentum=momentum,
            lr=lr,
            dampening=0.0,
            nesterov=self.phase.nesterov,
            maximize=False,
        )
        if momentum != 0:
            for param, buffer in zip(params, buffers, strict=True):
                self.state[param] = {"momentum_buffer": buffer}


# Parameters of two or more dimensions that are no weights either: token and position
# embeddings, relative position tables, layer scales (torchvision's names; timm models list
# theirs in `no_weight_decay()`).
NO_DECAY_NAMES = (
    "class_token",
    "pos_embedding",
    "relative_position_bias_table",
    "logit_scale",
    "layer_scale",
)


def decay_exempt(model: nn.Module) -> set[int]:
    """The ids of `model`'s parameters weight decay must spare: every one-dimensional parameter
    (biases, BatchNorm/LayerNorm scales and shifts) and those named in NO_DECAY_NAMES or in a
    timm module's `no_weight_decay()`."""
    named = dict(model.named_parameters())
    exempt = {id(p) for name, p in named.items() if p.ndim <= 1}
    exempt |= {id(p) for name, p in named.items() if name.rpartition(".")[2] in NO_DECAY_NAMES}
    for prefix, module in model.named_modules():
        listed = getattr(module, "no_weight_decay", None)
        if callable(listed):
            dotted = f"{prefix}." if prefix else ""
            exempt |= {id(named[f"{dotted}{n}"]) for n in listed() if f"{dotted}{n}" in named}
    return exempt


def make_optimizer(
    groups: list[list[nn.Parameter]],
    phase: PhaseParams,
    lr_scales: list[float] | None = None,
    exempt: set[int] | None = None,
) -> Optimizer:
    """One parameter group per list, each at `phase.lr` times its scale (discriminative LRs).

    Weight decay spares the parameters of `exempt` (default: the one-dimensional ones; see
    `decay_exempt`), as timm does: biases, norms' scales and shifts, embeddings and layer
    scales are not pulled towards 0. Each list is split in two groups for that."""
    scales = lr_scales or [1.0] * len(groups)
    param_groups = []
    for params, scale in zip(groups, scales, strict=True):
        spared = {id(p) for p in params if p.ndim <= 1} if exempt is None else exempt
        decayed = [p for p in params if id(p) not in spared]
        plain = [p for p in params if id(p) in spared]
        for members, decay in ((decayed, phase.weight_decay), (plain, 0.0)):
            if members:
                param_groups.append(
                    {
                        "params": members,
                        "lr": phase.lr * scale,
                        "scale": scale,
                        "weight_decay": decay,
                    }
                )
    return Optimizer(param_groups, phase)


def lr_factor(epoch: int, epochs: int, schedule: str, warmup_epochs: int = 0) -> float:
    """The LR multiplier of 0-based `epoch` out of `epochs`.

    Warm-up rises linearly to 1 over `warmup_epochs`; then `constant` stays at 1, `cosine`
    anneals towards 0, `onecycle` (at least 3 epochs; warm-up of 30 % of the epochs unless
    given) starts at 1/25, peaks at 1 in the first epoch after its warm-up and anneals to 1/1e4,
    reached in the last epoch, like torch's OneCycleLR but per epoch.
    """
    if schedule == "onecycle":
        warm = min(warmup_epochs or max(1, round(0.3 * epochs)), max(1, epochs - 2))
        if epoch < warm:
            return ONECYCLE_START + (1 - ONECYCLE_START) * epoch / warm
        progress = min(1.0, (epoch - warm) / max(1, epochs - 1 - warm))
        return ONECYCLE_END + (1 - ONECYCLE_END) * 0.5 * (1 + math.cos(math.pi * progress))
    if epoch < warmup_epochs:
        return (epoch + 1) / (warmup_epochs + 1)
    if schedule == "cosine":
        progress = (epoch - warmup_epochs) / max(1, epochs - warmup_epochs)
        return 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0


def set_epoch_lr(optimizer: Optimizer, phase: PhaseParams, epoch: int, epochs: int) -> float:
    """Set every group's LR for `epoch`; return the base LR (the head's) of that epoch."""
    factor = lr_factor(epoch, epochs, phase.schedule, phase.warmup_epochs)
    for group in optimizer.param_groups:
        group["lr"] = phase.lr * group["scale"] * factor
    return phase.lr * factor
