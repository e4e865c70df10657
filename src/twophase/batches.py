"""Batches of cached arrays, in a seeded order shared with the streamed-image path."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch


class BatchOrder:
    """Index batches for one epoch: a fresh seeded permutation per epoch, sorted within a batch.

    Sorting inside a batch changes nothing for the loss (a mean) but lets memory-mapped arrays
    be read front to back. Cached and streamed inputs share this order, hence the same batches.
    """

    def __init__(self, size: int, batch_size: int, shuffle: bool, seed: int = 0) -> None:
        self.size, self.batch_size, self.shuffle = size, batch_size, shuffle
        self.rng = np.random.default_rng(seed)

    def __iter__(self) -> Iterator[np.ndarray]:
        order = self.rng.permutation(self.size) if self.shuffle else np.arange(self.size)
        for start in range(0, self.size, self.batch_size):
            yield np.sort(order[start : start + self.batch_size])

    def __len__(self) -> int:
        return -(-self.size // self.batch_size)


def as_float_tensor(array: np.ndarray) -> torch.Tensor:
    """A cached batch as float32: float16 widened, uint16 read as bfloat16 bits (features.py)."""
    tensor = torch.from_numpy(array)
    if array.dtype == np.uint16:
        tensor = torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return tensor.float()


class ArrayBatches:
    """(inputs, labels) batches from in-memory or memory-mapped arrays, re-iterable per epoch.

    Each batch reads only its own rows (one fancy-indexed copy); a memory-mapped file is read
    front to back within a batch because the indices are sorted.
    """

    def __init__(
        self, inputs: np.ndarray, labels: np.ndarray, order: BatchOrder, nhwc: bool = False
    ) -> None:
        self.inputs, self.labels, self.order, self.nhwc = inputs, labels, order, nhwc

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for idx in self.order:
            inputs = as_float_tensor(np.asarray(self.inputs[idx]))
            if self.nhwc:  # stored channels-last: an NCHW view in channels_last layout, no copy
                inputs = inputs.permute(0, 3, 1, 2)
            yield inputs, torch.from_numpy(np.asarray(self.labels[idx], dtype=np.int64))

    def __len__(self) -> int:
        return len(self.order)


def array_batches(
    inputs: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    nhwc: bool = False,
) -> ArrayBatches:
    return ArrayBatches(inputs, labels, BatchOrder(len(labels), batch_size, shuffle, seed), nhwc)
