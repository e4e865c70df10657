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

    With `views` (K augmented views of every row, shaped (K, N, ...)), `set_epoch(e)` draws for
    every row one of its K + 1 views (0: `inputs`, the plain view), seeded by (seed, e).
    """

    def __init__(
        self,
        inputs: np.ndarray,
        labels: np.ndarray,
        order: BatchOrder,
        nhwc: bool = False,
        views: np.ndarray | None = None,
        seed: int = 0,
    ) -> None:
        self.inputs, self.labels, self.order, self.nhwc = inputs, labels, order, nhwc
        self.views, self.seed = views, seed
        self.drawn: np.ndarray | None = None  # the view of each row this epoch

    def set_epoch(self, epoch: int) -> None:
        if self.views is not None:
            rng = np.random.default_rng([self.seed, epoch])
            self.drawn = rng.integers(0, len(self.views) + 1, size=len(self.labels))

    def _rows(self, idx: np.ndarray) -> np.ndarray:
        if self.views is None or self.drawn is None:
            return np.asarray(self.inputs[idx])
        drawn = self.drawn[idx]
        rows = np.empty((len(idx), *self.inputs.shape[1:]), dtype=self.inputs.dtype)
        plain = drawn == 0
        rows[plain] = self.inputs[idx[plain]]
        for view in np.unique(drawn[~plain]):
            chosen = drawn == view
            rows[chosen] = self.views[view - 1][idx[chosen]]
        return rows

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for idx in self.order:
            inputs = as_float_tensor(self._rows(idx))
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
    views: np.ndarray | None = None,
) -> ArrayBatches:
    order = BatchOrder(len(labels), batch_size, shuffle, seed)
    return ArrayBatches(inputs, labels, order, nhwc, views, seed)
