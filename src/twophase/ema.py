"""Weight EMA (timm's `--model-ema`): an exponential moving average of the trained parameters,
which validation, early stopping and the saved weights use in their place.

After every optimizer step, for every parameter the optimizer updates:

    average = decay * average + (1 - decay) * parameter

The average starts as a copy of the starting weights, as timm's `ModelEmaV3` starts, and uses
the constant decay from the first step on (no warm-up of the decay: timm's default too). It
averages roughly the last 1 / (1 - decay) steps.

Buffers (BatchNorm running statistics) are not averaged: the averaged weights are scored with
the model's own buffers of the moment, that is, the buffers are copied from the model (timm's
`ModelEmaV3(exclude_buffers=True)`; its default averages floating-point buffers too). Running
statistics are already moving averages; phase 1's head has no BatchNorm, and with
`finetune.batchnorm: frozen` (the default) the statistics never move, so there both choices
are the same.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch


class WeightAverage:
    """The moving average of `params` (the tensors the optimizer updates) at `decay`."""

    def __init__(self, params: Sequence[torch.Tensor], decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"an EMA decay is in (0, 1), not {decay}")
        self.params, self.decay = list(params), decay
        self.averages = [param.detach().clone() for param in self.params]

    @torch.no_grad()
    def update(self) -> None:
        """One step of the average: decay * average + (1 - decay) * parameter, computed as
        average + (1 - decay) * (parameter - average), which keeps an unchanged parameter's
        average bit for bit."""
        for average, param in zip(self.averages, self.params, strict=True):
            average.lerp_(param.detach(), 1.0 - self.decay)

    @contextmanager
    def in_place(self) -> Iterator[None]:
        """The averages in the parameters' place inside the block (the same tensors, so every
        module sharing them, and a state dict taken there, sees the averages); the trained
        values back after it."""
        with torch.no_grad():
            trained = [param.detach().clone() for param in self.params]
            for param, average in zip(self.params, self.averages, strict=True):
                param.copy_(average)
        try:
            yield
        finally:
            with torch.no_grad():
                for param, value in zip(self.params, trained, strict=True):
                    param.copy_(value)
