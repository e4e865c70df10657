"""Where and how tensors are computed: device, autocast, seeding, threads."""

from __future__ import annotations

import contextlib
import random
from contextlib import AbstractContextManager

import numpy as np
import torch

from twophase.params import ParamsError


def resolve_device(requested: str = "auto") -> torch.device:
    """'auto' picks cuda, then mps, then cpu; an explicit choice must be available."""
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ParamsError(
            "device: 'cuda' was requested but no CUDA GPU is visible; use auto or cpu"
        )
    if requested == "mps" and not torch.backends.mps.is_available():
        raise ParamsError("device: 'mps' was requested but MPS is not available; use auto or cpu")
    return torch.device(requested)


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for `precision` on `device`, or None to run in fp32.

    'auto' means bf16 on CUDA GPUs that compute it natively (Ampere and later), fp16 (with a
    GradScaler in training) on those that only emulate bf16 (T4, V100), and fp32 elsewhere: on
    CPU bf16 autocast was measured slower than fp32 for ResNet18 (bench/RESULTS.md).
    """
    if precision == "fp32":
        return None
    if precision == "auto":
        if device.type != "cuda":
            return None
        native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        return torch.bfloat16 if native_bf16 else torch.float16
    if precision == "fp16" and device.type != "cuda":
        raise ParamsError(f"precision: fp16 autocast needs a CUDA device, not {device.type}")
    if precision == "bf16" and device.type == "mps":
        raise ParamsError("precision: bf16 autocast is not supported on mps; use fp32")
    return torch.bfloat16 if precision == "bf16" else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager[object]:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def to_device(inputs: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`inputs` on `device`; images and activations channels-last, the layout the convolutions
    run fastest in on CPU (bench/RESULTS.md)."""
    inputs = inputs.to(device, non_blocking=True)
    if inputs.dim() == 4:
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    return inputs
