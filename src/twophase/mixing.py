"""MixUp and CutMix: a training batch mixed with a permutation of itself, and its soft targets.

MixUp (Zhang et al. 2018) blends every input with a partner's, x' = lam * x + (1 - lam) *
x[perm]; CutMix (Yun et al. 2019) pastes a box of the partner's image into it. The target is
mixed the same way: lam * t(y) + (1 - lam) * t(y[perm]), where t is the label-smoothed one-hot
((1 - eps) * onehot + eps / C), so each one-hot is smoothed first, then mixed, as timm's
`mixup_target` does. MixUp works on any input (cached embeddings and activations: manifold
mixup; streamed images); CutMix needs images.

The draws are keyed, not taken from a generator's state, so nothing else that draws random
numbers moves them and they cost no draw when mixing is off:
- from (seed, epoch, step) alone, the same on every DDP rank: which of the two mixes when both
  alphas are set (CutMix with probability SWITCH_PROB, timm's default), lam ~ Beta(alpha, alpha)
  and CutMix's box;
- from (seed, epoch, step, rank): the partners, a permutation of this rank's own rows. Under DDP
  a row mixes with a row of its own rank's slice of the global batch, so N processes pair the
  rows otherwise than one process does: alike in distribution, not the same numbers.

A random permutation, not timm's reversal of the batch: a batch holds its rows sorted by index
(batches.py), and indices often follow the classes, so a reversed batch would pair the first
classes with the last ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

SWITCH_PROB = 0.5  # with both alphas set: the chance that a batch is cut rather than mixed up
_TAG = 0x6D6978  # keys the mixing draws apart from the other keyed draws of (seed, epoch)


@dataclass(frozen=True)
class Mixing:
    """A phase's mixing alphas (0: off)."""

    mixup: float = 0.0
    cutmix: float = 0.0

    @property
    def active(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0

    def draw(
        self,
        rows: int,
        shape: tuple[int, ...],
        seed: int,
        epoch: int,
        step: int,
        rank: int = 0,
        device: torch.device | None = None,
    ) -> Mix:
        """The mix of training step `step` of `epoch` for a rank's batch of `rows` inputs of
        `shape` (one input's shape: (C, H, W) for images)."""
        shared = np.random.default_rng([seed, epoch, step, _TAG])
        if self.mixup > 0 and self.cutmix > 0:
            cut = bool(shared.random() < SWITCH_PROB)
        else:
            cut = self.cutmix > 0
        alpha = self.cutmix if cut else self.mixup
        lam = float(shared.beta(alpha, alpha))
        box = None
        if cut:
            if len(shape) != 3:
                raise ValueError(f"CutMix pastes boxes of images, not of inputs shaped {shape}")
            height, width = shape[-2:]
            centre = int(shared.integers(0, height)), int(shared.integers(0, width))
            box = cutmix_box(lam, height, width, *centre)
            lam = 1 - box_area(box) / (height * width)
        order = np.random.default_rng([seed, epoch, step, _TAG, rank]).permutation(rows)
        return Mix(lam, torch.as_tensor(order, device=device), box)


def cutmix_box(
    lam: float, height: int, width: int, top_centre: int, left_centre: int
) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the box around a centre holding 1 - lam of the image,
    clipped at its borders (timm's `rand_bbox`)."""
    ratio = math.sqrt(1 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    top = min(max(top_centre - cut_h // 2, 0), height)
    bottom = min(max(top_centre + (cut_h + 1) // 2, 0), height)
    left = min(max(left_centre - cut_w // 2, 0), width)
    right = min(max(left_centre + (cut_w + 1) // 2, 0), width)
    return top, bottom, left, right


def box_area(box: tuple[int, int, int, int]) -> int:
    top, bottom, left, right = box
    return (bottom - top) * (right - left)


@dataclass(frozen=True)
class Mix:
    """One batch's mix: row i takes `lam` of itself and 1 - lam of row `perm[i]` (CutMix: lam
    is the share of the image outside `box`, after clipping at the borders)."""

    lam: float
    perm: torch.Tensor
    box: tuple[int, int, int, int] | None = None  # CutMix's (top, bottom, left, right)

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """The mixed batch (a new tensor: `x` is left as it was)."""
        partners = x[self.perm]
        if self.box is None:
            return x * self.lam + partners * (1 - self.lam)
        top, bottom, left, right = self.box
        mixed = x.clone()
        mixed[..., top:bottom, left:right] = partners[..., top:bottom, left:right]
        return mixed

    def targets(self, labels: torch.Tensor, classes: int, smoothing: float = 0.0) -> torch.Tensor:
        """Soft targets, rows summing to 1: each one-hot smoothed, then mixed."""
        own = nn.functional.one_hot(labels, classes).float() * (1 - smoothing) + smoothing / classes
        return own * self.lam + own[self.perm] * (1 - self.lam)

    def dominant(self, labels: torch.Tensor) -> torch.Tensor:
        """The label holding the larger share of each row's target (its own at lam = 0.5): the
        argmax of the target, what the training accuracy counts a prediction against."""
        return labels if self.lam >= 0.5 else labels[self.perm]
