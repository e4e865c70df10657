"""Test-time augmentation: the inputs a mode scores an image by, and how their answers combine.

One definition for every place that uses it: the features stage caches the trunk's outputs on
`mirrored` images, and `twophase predict --tta flip` runs the network on them, so the cached
path and the raw-image path score the same inputs. The mirror is taken of the preprocessed
tensor (resized, centre-cropped, normalised): the model's own input, flipped left to right.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def mirrored(images: torch.Tensor) -> torch.Tensor:
    """Each image of an (N, C, H, W) batch flipped left to right (its last, width, axis)."""
    return torch.flip(images, dims=[-1])


def views(images: torch.Tensor, mode: str) -> list[torch.Tensor]:
    """The batches a mode scores: the images themselves, then (flip) their mirrors."""
    if mode == "none":
        return [images]
    if mode == "flip":
        return [images, mirrored(images)]
    raise ValueError(f"test-time augmentation {mode!r} is not one of none, flip")


def average(probabilities: Sequence[torch.Tensor]) -> torch.Tensor:
    """The mean of the views' class probabilities (softmax outputs), per image and class."""
    if len(probabilities) == 1:
        return probabilities[0]
    return torch.stack(list(probabilities)).mean(dim=0)
