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

import numpy as np
import torch
import torch.distributed as dist

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


def rank_slice(batch: np.ndarray, world: World) -> np.ndarray:
    """This rank's contiguous part of a global batch (the batches' sizes differ by at most 1)."""
    if not world.distributed:
        return batch
    return np.array_split(batch, world.size)[world.rank]
