"""Several processes for one stage, on PyTorch's own engine: torchrun + DistributedDataParallel.

With `compute.nproc > 1` a stage script relaunches itself under torchrun (users still type
`dvc repro`); each process then calls `setup()`, which joins the process group (nccl on CUDA,
gloo on CPU) and picks its device. Work is split by *global batch*: every rank walks the same
seeded batch order and takes its own slice of each batch (training) or every world-th batch
(feature extraction), so the results match one process with the same global batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from twophase.errors import TwophaseError
from twophase.runtime import resolve_device


@dataclass(frozen=True)
class World:
    """This process's place among the stage's processes (rank 0 of 1 without torchrun)."""

    rank: int = 0
    size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def device_for(self, requested: str) -> torch.device:
        """Under torchrun, the device `setup` gave this rank; else `requested` (params.device)."""
        return self.device if self.distributed else resolve_device(requested)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def sum(self, *values: float) -> list[float]:
        """The sums over every rank of `values` (float64, so the totals are exact for counts)."""
        if not self.distributed:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self._collective_device())
        dist.all_reduce(tensor)
        return [float(v) for v in tensor.tolist()]

    def broadcast(self, value: object) -> object:
        """Rank 0's `value`, on every rank."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _collective_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


SINGLE = World()


def setup(requested_device: str = "auto") -> World:
    """Join the process group when started by torchrun; otherwise one process on `device`."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return World(device=resolve_device(requested_device))
    device = resolve_device(requested_device)
    local_rank = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    world = World(rank=dist.get_rank(), size=dist.get_world_size(), device=device)
    if world.is_main:
        print(f"torchrun: {world.size} processes, backend {dist.get_backend()}, on {device.type}")
    return world


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm that, training under DDP, normalises with the statistics of the whole global
    batch (every rank's slice), as one process does: SyncBatchNorm's role, on gloo and CPU too
    (torch's SyncBatchNorm needs a GPU). The all-reduces are differentiable, so the gradients
    are the global batch's. Same parameters and buffers as the layer it replaces."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(input)
        from torch.distributed.nn.functional import (  # differentiable all-reduce
            all_reduce,
        )

        dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)
        x = input.float()
        count = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype, device=x.device)
        local = torch.cat([x.sum(dims), count])
        totals: torch.Tensor = all_reduce(local)  # type: ignore[no-untyped-call]
        rows = totals[-1]
        mean = totals[:-1] / rows
        squares = ((x - mean.view(shape)) ** 2).sum(dims)
        var: torch.Tensor = all_reduce(squares) / rows  # type: ignore[no-untyped-call]
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                assert self.num_batches_tracked is not None and self.running_var is not None
                self.num_batches_tracked.add_(1)
                m = self.momentum
                if m is None:  # a cumulative moving average, as _BatchNorm does
                    m = 1.0 / float(self.num_batches_tracked)
                unbiased = var * (rows / (rows - 1).clamp(min=1))
                self.running_mean.mul_(1 - m).add_(mean.to(self.running_mean.dtype), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)
        out = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        result: torch.Tensor = out.to(input.dtype)
        return result


PLAIN_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class UnsupportedBatchNormError(TwophaseError):
    """A layer that normalises by batch statistics but is not a plain BatchNorm."""


def global_batchnorm(model: nn.Module, layers: set[int], where: str = "") -> nn.Module:
    """Replace, in place, the BatchNorm layers of `model` whose ids are in `layers` by
    GlobalBatchNorms sharing their parameters and buffers (the state dict keeps its keys).

    Only the plain classes are replaced: a subclass may do more in its forward (timm's
    BatchNormAct2d also runs an activation), so it is refused rather than changed."""
    for name, child in list(model.named_children()):
        full = f"{where}.{name}" if where else name
        if id(child) not in layers:
            global_batchnorm(child, layers, full)
        elif type(child) in PLAIN_BATCHNORMS:
            assert isinstance(child, nn.modules.batchnorm._BatchNorm)
            twin = GlobalBatchNorm(
                child.num_features,
                child.eps,
                child.momentum,
                child.affine,
                child.track_running_stats,
            )
            twin.weight, twin.bias = child.weight, child.bias
            twin.running_mean, twin.running_var = child.running_mean, child.running_var
            twin.num_batches_tracked = child.num_batches_tracked
            twin.train(child.training)
            setattr(model, name, twin)
        elif not isinstance(child, GlobalBatchNorm):
            raise UnsupportedBatchNormError(
                f"finetune.batchnorm: train with compute.nproc > 1 normalises with the global "
                f"batch's statistics, which {full} ({type(child).__name__}) cannot: use "
                "finetune.batchnorm: frozen, or one process"
            )
    return model
