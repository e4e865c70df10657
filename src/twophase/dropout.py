"""Dropout drawn from a key, not from a random generator's state.

Every mask element is a hash of (seed, epoch, step, layer call, global row, element): the masks
of a global batch are the same whether one process trains on it or N processes each train on a
slice of it (a rank hashes its own rows' positions in the global batch), and nothing else that
draws random numbers (data-loading processes, a library's initialisation) can move them.

`fit` replaces the network's dropout modules by their keyed twins (`keyed_dropouts`) and runs
each training step inside `keyed(...)`. Outside such a step (a user's own loop) the twins drop
out as torch does. Handled: `nn.Dropout`, torchvision's `StochasticDepth` and timm's `DropPath`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import nn

_MASK64 = (1 << 64) - 1


def _signed(value: int) -> int:
    """A 64-bit pattern as the int64 torch stores it."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN, _MIX1, _MIX2 = (
    _signed(0x9E3779B97F4A7C15),
    _signed(0xBF58476D1CE4E5B9),
    _signed(0x94D049BB133111EB),
)


def _mix(value: int) -> int:
    """splitmix64 of a Python int (the key of one layer call)."""
    z = (value + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _shift(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch shifts signed integers arithmetically)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def _hash(ids: torch.Tensor, key: int) -> torch.Tensor:
    """splitmix64 of `ids ^ key`, element-wise, in int64 arithmetic (wrapping, as two's
    complement does on every device torch runs on)."""
    z = (ids ^ _signed(key)) + _GOLDEN
    z = (z ^ _shift(z, 30)) * _MIX1
    z = (z ^ _shift(z, 27)) * _MIX2
    return z ^ _shift(z, 31)


@dataclass
class _Step:
    key: int  # (seed, epoch, step), mixed
    offset: int  # the position of this process's first row in the global batch
    calls: int = 0  # dropout layers called so far in this step: each gets its own masks


_STEP: ContextVar[_Step | None] = ContextVar("twophase_dropout_step", default=None)


@contextmanager
def keyed(seed: int, epoch: int, step: int, offset: int = 0) -> Iterator[None]:
    """Draw the masks of the dropout layers called inside from (seed, epoch, step); this
    process's rows sit at `offset` onwards in the global batch."""
    key = _mix(_mix(_mix(seed & _MASK64) ^ (epoch & _MASK64)) ^ (step & _MASK64))
    token = _STEP.set(_Step(key, offset))
    try:
        yield
    finally:
        _STEP.reset(token)


BITS = 53  # random bits per draw: `draws` are integers in [0, 2**53)


def draws(
    shape: tuple[int, ...], device: torch.device, whole_batch: bool = False
) -> torch.Tensor | None:
    """Random integers in [0, 2**BITS) of `shape` (rows first) for the current keyed step, or
    None outside one. With `whole_batch`, one draw shared by every row of the global batch.
    Integers, not floats: compared with a threshold, they need no float64 (absent on MPS)."""
    step = _STEP.get()
    if step is None:
        return None
    layer_key = _mix(step.key ^ step.calls)
    step.calls += 1
    rows, per_row = shape[0], math.prod(shape[1:])
    first = 0 if whole_batch else step.offset
    positions = torch.arange(first, first + rows, device=device, dtype=torch.int64)
    ids = positions[:, None] * per_row + torch.arange(per_row, device=device, dtype=torch.int64)
    return _shift(_hash(ids, layer_key), 64 - BITS).view(shape)


def threshold(probability: float) -> int:
    """The draw below which an event of `probability` happens."""
    return round(probability * (1 << BITS))


class KeyedDropout(nn.Dropout):
    """nn.Dropout with keyed masks (same `p`, same scaling by 1 / (1 - p))."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        drawn = draws(tuple(x.shape), x.device)
        if drawn is None:
            return super().forward(x)
        if self.p == 1:
            return x * 0
        return x * ((drawn >= threshold(self.p)).to(x.dtype) / (1 - self.p))


class KeyedDropPath(nn.Module):
    """Stochastic depth (torchvision's StochasticDepth, timm's DropPath) with keyed draws:
    `row` drops whole samples' residual branches, `batch` the whole batch's."""

    def __init__(self, p: float, mode: str = "row", scale_by_keep: bool = True) -> None:
        super().__init__()
        self.p, self.mode, self.scale_by_keep = p, mode, scale_by_keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        rows = x.shape[0] if self.mode == "row" else 1
        shape = (rows,) + (1,) * (x.dim() - 1)
        keep = 1 - self.p
        drawn = draws(shape, x.device, whole_batch=self.mode == "batch")
        if drawn is None:
            mask = (torch.rand(shape, device=x.device) < keep).to(x.dtype)
        else:
            mask = (drawn < threshold(keep)).to(x.dtype)
        if keep > 0 and self.scale_by_keep:
            mask = mask / keep
        return x * mask

    def extra_repr(self) -> str:
        return f"p={self.p}, mode={self.mode}"


def keyed_dropouts(module: nn.Module) -> nn.Module:
    """Replace, in place, every dropout layer under `module` by its keyed twin; returns it.

    The twins have no parameters or buffers, so the state dict keeps its keys."""
    for name, child in list(module.named_children()):
        twin = _keyed_twin(child)
        if twin is None:
            keyed_dropouts(child)
        else:
            twin.train(child.training)
            setattr(module, name, twin)
    return module


def _keyed_twin(layer: nn.Module) -> nn.Module | None:
    kind, settings = type(layer), vars(layer)
    if kind is nn.Dropout:
        return KeyedDropout(float(settings["p"]))
    # matched by name: importing torchvision or timm here would slow every stage's start
    if kind.__name__ == "StochasticDepth" and kind.__module__.startswith("torchvision."):
        return KeyedDropPath(float(settings["p"]), str(settings["mode"]))
    if kind.__name__ == "DropPath" and kind.__module__.startswith("timm."):
        p, scale = float(settings["drop_prob"]), bool(settings["scale_by_keep"])
        return KeyedDropPath(p, "row", scale)
    return None
