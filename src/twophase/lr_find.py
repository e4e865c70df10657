"""The LR finder (fastai's `lr_find`, Smith's LR range test), at cache speed.

A short training run at an exponentially growing learning rate, on the phase's cached training
inputs, with the network, optimizer and batches built as the phase builds them (phases.py and
`train.phase_optimizer`: params.yaml's optimizer, weight decay, label smoothing, batch size and,
in phase 2, the unfrozen blocks and their discriminative LRs). Only the LR differs from
training: step i of N trains at `start * (end / start) ** (i / N)`, fastai's schedule, given as
the head's LR (every other parameter group at its scale of it, as in training); the schedule,
warm-up and EMA of params.yaml play no part.

Each step's training loss (taken before its step, as fastai records it) is smoothed by a
debiased moving average (fastai's, beta 0.98); the run stops after N steps, or once the smoothed
loss exceeds 4 times its lowest (diverged), or turns NaN or infinite. The suggestion is fastai's
default, `valley`: on the smoothed curve, without its first N // 10 and last 5 points, the
longest run of decreasing losses, and in it the point about halfway along, where the loss still
falls steeply. The network trained here is thrown away; nothing is saved but the curve.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn

from twophase.batches import Batches
from twophase.cache import FeatureCacheError
from twophase.distributed import SINGLE
from twophase.dropout import keyed_dropouts
from twophase.errors import TwophaseError
from twophase.io import atomic_path
from twophase.mixing import Mixing
from twophase.network import ParamGroups, discriminative_groups
from twophase.params import Params, PhaseParams
from twophase.phases import (
    class_weights,
    finetune_start,
    last_batch_error,
    trainable_tail,
    training_inputs,
    transfer_inputs,
)
from twophase.runtime import autocast_dtype, seed_everything
from twophase.train import NonFiniteLossError, phase_optimizer, run_epoch

PHASES = ("transfer", "finetune")
EMBEDDINGS = Path("data/embeddings")
ACTIVATIONS = Path("data/activations")
TRANSFER = Path("models/transfer.pt")
SPLIT = Path("data/split.csv")
CURVES = Path("plots/lr_find")  # <phase>.csv, declared under dvc.yaml's top-level plots

START_LR, END_LR, STEPS = 1e-7, 10.0, 100  # fastai's defaults
SMOOTHING = 0.98  # fastai's AvgSmoothLoss
DIVERGED = 4.0  # stop once the smoothed loss exceeds this many times its lowest


@dataclass(frozen=True)
class LrCurve:
    """The loss at each step's learning rate, smoothed, and the suggested LR."""

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggestion: float
    diverged: bool

    def rows(self) -> Iterator[tuple[int, float, float, float, float]]:
        """(step, lr, log10 of lr, loss, smoothed loss) per step."""
        for step, (lr, loss, smooth) in enumerate(
            zip(self.lrs, self.losses, self.smoothed, strict=True)
        ):
            yield step, lr, math.log10(lr), loss, smooth


def lr_schedule(step: int, steps: int, start: float, end: float) -> float:
    """fastai's exponential schedule: `start` at step 0, growing towards `end` at step `steps`."""
    return float(start * (end / start) ** (step / steps))


def valley(lrs: Sequence[float], losses: Sequence[float]) -> float:
    """fastai's `valley`: the LR about halfway along the longest run of decreasing losses (the
    longest decreasing subsequence, in O(n²) for n points, n <= a few hundred). As fastai, the
    run is taken to start one point before its first, and the point is a third plus a sixth of
    its length (each rounded down) past that start."""
    count = len(losses)
    lengths = [1] * count
    start = end = 0
    for i in range(1, count):
        for j in range(i):
            if losses[i] < losses[j] and lengths[i] < lengths[j] + 1:
                lengths[i] = lengths[j] + 1
            if lengths[end] < lengths[i]:
                end = i
                start = end - lengths[end]
    sections = (end - start) / 3
    return lrs[start + int(sections) + int(sections / 2)]


def suggest(lrs: Sequence[float], smoothed: Sequence[float], steps: int) -> float:
    """`valley` on the curve without its first `steps // 10` and last 5 points (fastai's
    trimming); on the whole curve when a diverged run leaves too few points for that."""
    first, last = steps // 10, len(lrs) - 5
    if last - first >= 2:
        return valley(lrs[first:last], smoothed[first:last])
    return valley(lrs, smoothed)


def cycle(batches: Batches) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The batches epoch after epoch (epochs 1, 2, ... told to batches with `set_epoch`, which
    draw their augmented views from it, as in training)."""
    set_epoch = getattr(batches, "set_epoch", lambda epoch: None)
    for epoch in itertools.count(1):
        set_epoch(epoch)
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            raise ValueError("no batches to run: the split is empty")


def sweep(
    model: nn.Module,
    batches: Batches,
    phase: PhaseParams,
    groups: ParamGroups | None = None,
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    seed: int = 0,
    steps: int = STEPS,
    start: float = START_LR,
    end: float = END_LR,
    class_weights: torch.Tensor | None = None,
    mixing: Mixing | None = None,
) -> LrCurve:
    """Train `model` for up to `steps` steps on `batches` (cycled, one epoch after another) at
    the exponentially growing LR, with the optimizer `fit` would build for `phase` and `groups`;
    one training step of the loop each (`train.run_epoch` on one batch: the phase's loss)."""
    if not 0 < start < end or steps < 2:
        raise TwophaseError(
            f"lr-find needs 0 < start LR < end LR and 2 steps or more, not {start:g}, {end:g}, "
            f"{steps}"
        )
    keyed_dropouts(model)
    model.to(device).to(memory_format=torch.channels_last)
    optimizer, scaler = phase_optimizer(model, phase, groups, device, amp_dtype)
    stream = cycle(batches)
    lrs: list[float] = []
    losses: list[float] = []
    smoothed: list[float] = []
    average, lowest, diverged = 0.0, math.inf, False
    for step in range(steps):
        lr = lr_schedule(step, steps, start, end)
        for group in optimizer.param_groups:  # the head at lr, other groups at their scale
            group["lr"] = lr * group["scale"]
        loss, _ = run_epoch(
            model,
            [next(stream)],
            device,
            amp_dtype,
            optimizer,
            scaler,
            phase.label_smoothing,
            seed=seed,
            epoch=step,  # dropout masks and mixing draws keyed by the step
            class_weights=None if class_weights is None else class_weights.to(device),
            mixing=mixing,
        )
        if not math.isfinite(loss):
            diverged = True
            break
        average = SMOOTHING * average + (1 - SMOOTHING) * loss
        smooth = average / (1 - SMOOTHING ** (step + 1))  # debiased, as fastai's
        lrs.append(lr)
        losses.append(loss)
        smoothed.append(smooth)
        lowest = min(lowest, smooth)
        if smooth > DIVERGED * lowest:
            diverged = True
            break
    if not lrs:
        raise NonFiniteLossError(
            f"lr-find: the loss was not finite at the first step (lr={start:g})"
        )
    return LrCurve(lrs, losses, smoothed, suggest(lrs, smoothed, steps), diverged)


def missing_input(phase: str, params: Params) -> str | None:
    """A one-line message naming the first input of `phase` that the workspace lacks, and the
    stage that makes it; None when all are there."""
    if phase == "transfer":
        arrays = ["train_embeddings", "train_labels", "val_embeddings", "val_labels"]
        needed = [EMBEDDINGS / "meta.json", *(EMBEDDINGS / f"{name}.npy" for name in arrays)]
    elif params.finetune.input == "images":
        needed = [ACTIVATIONS / "meta.json", SPLIT]
    else:
        arrays = ["train_activations", "train_labels"]
        needed = [ACTIVATIONS / "meta.json", *(ACTIVATIONS / f"{name}.npy" for name in arrays)]
    for path in needed:
        if not path.exists():
            return f"{path} is missing: run `dvc repro features` first (lr-find reads the cache)"
    if phase == "finetune" and not TRANSFER.exists():
        return (
            f"{TRANSFER} is missing: run `dvc repro train_transfer` first (phase 2 starts from "
            "phase 1's checkpoint)"
        )
    return None


def find_lr(
    params: Params,
    phase: str,
    steps: int = STEPS,
    start: float = START_LR,
    end: float = END_LR,
) -> LrCurve:
    """The LR finder on `phase` ("transfer" or "finetune") as params.yaml sets it up, from the
    workspace's feature cache (and, for phase 2, phase 1's checkpoint); seeded by `params.seed`.
    """
    if phase not in PHASES:
        raise ValueError(f"phase {phase!r} is none of {PHASES}")
    if phase == "transfer" and params.train_transfer.solver == "lbfgs":
        raise TwophaseError(
            "lr-find --phase transfer: train_transfer.solver is lbfgs, a linear probe that takes "
            "no learning rate (solver: sgd trains with train_transfer.lr)"
        )
    message = missing_input(phase, params)
    if message:
        raise FeatureCacheError(message)
    seed_everything(params.seed)
    device = SINGLE.device_for(params.device)
    run = partial(
        sweep,
        device=device,
        amp_dtype=autocast_dtype(device, params.precision),
        seed=params.seed,
        steps=steps,
        start=start,
        end=end,
    )
    if phase == "transfer":  # as phases.train_transfer builds it
        inputs = transfer_inputs(params, EMBEDDINGS)
        transfer = params.train_transfer
        weights = class_weights(
            transfer, "train_transfer", inputs.train[1], inputs.meta["class_names"]
        )
        return run(
            inputs.head,
            inputs.batches(params)[0],
            transfer,
            class_weights=weights,
            mixing=Mixing(transfer.mixup),
        )
    # as phases.finetune builds it
    begin = finetune_start(params, ACTIVATIONS, TRANSFER)
    tail = trainable_tail(params, begin)
    split = None
    if params.finetune.input == "images":
        from twophase.datasets import read_index  # pandas: only for the streamed images

        split = read_index(SPLIT)
    model, train_batches, labels = training_inputs(params, begin, tail, ACTIVATIONS, split, device)
    groups = discriminative_groups(tail, begin.blocks, params.finetune.lr_decay)
    phase2 = params.finetune
    try:
        return run(
            model,
            train_batches,
            phase2,
            groups,
            class_weights=class_weights(phase2, "finetune", labels, begin.meta["class_names"]),
            mixing=Mixing(phase2.mixup, phase2.cutmix),
        )
    except ValueError as err:
        raise last_batch_error(phase2, len(labels), err) from None


def write_curve(curve: LrCurve, path: Path) -> None:
    """The curve as CSV (step, lr, log10_lr, loss, smoothed): `dvc plots show` draws it."""
    lines = ["step,lr,log10_lr,loss,smoothed"]
    for step, lr, log_lr, loss, smooth in curve.rows():
        lines.append(f"{step},{lr:.6g},{log_lr:.6f},{loss:.6f},{smooth:.6f}")
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
