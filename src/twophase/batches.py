"""Batches of cached arrays, in a seeded order shared with the streamed-image path."""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]  # (inputs, labels), re-iterable per epoch


class BatchOrder:
    """Index batches for one epoch: a fresh seeded permutation per epoch, sorted within a batch.

    Sorting inside a batch changes nothing for the loss (a mean) but lets memory-mapped arrays
    be read front to back. Cached and streamed inputs share this order, hence the same batches.
    Under DDP every rank draws the same global batches and keeps its `rank`-th of `ranks`
    contiguous slices of each (sizes differ by at most one; a slice may be empty).

    `window` > 0 shuffles in blocks, for files larger than memory: the rows are cut into blocks
    of `batch_size` consecutive rows, the blocks are permuted, and rows are shuffled only among
    `window` blocks at a time, so an epoch reads the file in runs of a block, each once.
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        rank: int = 0,
        ranks: int = 1,
        window: int = 0,
    ) -> None:
        self.size, self.batch_size, self.shuffle = size, batch_size, shuffle
        self.rank, self.ranks, self.window = rank, ranks, window
        self.rng = np.random.default_rng(seed)

    def _permutation(self) -> np.ndarray:
        if not self.window:
            return self.rng.permutation(self.size)
        full_blocks = self.size // self.batch_size
        # the short last block stays last, so that every window but the last fills whole batches
        starts = [*self.rng.permutation(full_blocks) * self.batch_size]
        if self.size % self.batch_size:
            starts.append(full_blocks * self.batch_size)
        parts = []
        for first in range(0, len(starts), self.window):
            window = starts[first : first + self.window]
            rows = [np.arange(s, min(s + self.batch_size, self.size)) for s in window]
            parts.append(self.rng.permutation(np.concatenate(rows)))
        return np.concatenate(parts)

    def __iter__(self) -> Iterator[np.ndarray]:
        order = self._permutation() if self.shuffle else np.arange(self.size)
        for start in range(0, self.size, self.batch_size):
            batch = np.sort(order[start : start + self.batch_size])
            if self.ranks == 1:
                yield batch
            else:
                start = slice_start(len(batch), self.rank, self.ranks)
                yield batch[start : slice_start(len(batch), self.rank + 1, self.ranks)]

    def __len__(self) -> int:
        return -(-self.size // self.batch_size)


def slice_start(batch_size: int, rank: int, ranks: int) -> int:
    """Where rank `rank`'s contiguous slice of a global batch starts: the first
    `batch_size % ranks` slices hold one row more (numpy's array_split)."""
    base, extra = divmod(batch_size, ranks)
    return rank * base + min(rank, extra)


def as_float_tensor(array: np.ndarray) -> torch.Tensor:
    """A cached batch as float32: float16 widened, uint16 read as bfloat16 bits (cache.py)."""
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

    Speed, never results: `num_workers` processes read the batches ahead (two each, into pinned
    memory with `pin_memory`), so a GPU does not wait on disk reads; `resident(device)` holds
    the arrays on that device instead, when they fit in its memory.
    """

    def __init__(
        self,
        inputs: np.ndarray,
        labels: np.ndarray,
        order: BatchOrder,
        nhwc: bool = False,
        views: np.ndarray | None = None,
        seed: int = 0,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        self.reader = BatchReader(inputs, labels, nhwc, views)
        self.order, self.seed, self.labels = order, seed, labels
        self.num_views = 0 if views is None else len(views)
        self.drawn: np.ndarray | None = None  # the view of each row this epoch
        self.loader: DataLoader[tuple[torch.Tensor, torch.Tensor]] | None = None
        if num_workers > 0:
            self.loader = DataLoader(
                self.reader,
                batch_size=None,
                sampler=_Keys(self),
                num_workers=num_workers,
                pin_memory=pin_memory,
                prefetch_factor=2,
                persistent_workers=True,
                # its own generator: starting the workers must not draw from the global RNG
                generator=torch.Generator().manual_seed(seed),
            )

    def set_epoch(self, epoch: int) -> None:
        if self.num_views:
            rng = np.random.default_rng([self.seed, epoch])
            self.drawn = rng.integers(0, self.num_views + 1, size=len(self.labels))

    def resident(self, device: torch.device) -> ArrayBatches:
        """The same batches, gathered from copies of the arrays on `device` (one upload)."""
        self.reader = self.reader.to(device)
        self.loader = None
        return self

    def keys(self) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        return _keys(self.order, self.drawn)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.loader is not None:
            return iter(self.loader)
        return (self.reader[key] for key in self.keys())

    def __len__(self) -> int:
        return len(self.order)


def _keys(
    order: BatchOrder, drawn: np.ndarray | None
) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """Each batch's row indices and their views this epoch (`set_epoch` replaces `drawn`)."""
    for idx in order:
        yield idx, None if drawn is None else drawn[idx]


class _Keys:
    """The sampler of the reading processes: this epoch's keys, drawn in the main process.

    Neither it nor the epoch's iterator of keys holds its batches (a weak reference): a cycle
    (batches -> loader -> sampler or its iterator -> batches) would leave the loader to the
    cyclic collector, which may close the workers' queues before the loader tells the workers
    to stop, and each worker is then waited for 5 s and killed."""

    def __init__(self, batches: ArrayBatches) -> None:
        self.batches = weakref.ref(batches)

    def _batches(self) -> ArrayBatches:
        batches = self.batches()
        if batches is None:  # pragma: no cover - the loader lives inside its batches
            raise RuntimeError("the batches of this sampler are gone")
        return batches

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        return self._batches().keys()

    def __len__(self) -> int:
        return len(self._batches())


Rows = np.ndarray | torch.Tensor


class BatchReader(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Reads the batch of a key (row indices, and each row's view or None) from the arrays.

    Picklable for reading processes: a memory-mapped array travels as its file's name and is
    mapped again there, never copied."""

    def __init__(
        self, inputs: Rows, labels: Rows, nhwc: bool = False, views: Rows | None = None
    ) -> None:
        self.inputs, self.labels, self.nhwc, self.views = inputs, labels, nhwc, views

    def __getitem__(
        self, key: tuple[np.ndarray, np.ndarray | None]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        idx, drawn = key
        inputs = _as_float(self._rows(idx, drawn))
        if self.nhwc:  # stored channels-last: an NCHW view in channels_last layout, no copy
            inputs = inputs.permute(0, 3, 1, 2)
        if isinstance(self.labels, torch.Tensor):
            return inputs, self.labels[torch.as_tensor(idx, device=self.labels.device)].long()
        return inputs, torch.from_numpy(np.asarray(self.labels[idx], dtype=np.int64))

    def _rows(self, idx: np.ndarray, drawn: np.ndarray | None) -> Rows:
        if isinstance(self.inputs, torch.Tensor):
            return self._rows_on_device(self.inputs, idx, drawn)
        if self.views is None or drawn is None:
            return np.asarray(self.inputs[idx])
        rows = np.empty((len(idx), *self.inputs.shape[1:]), dtype=self.inputs.dtype)
        plain = drawn == 0
        rows[plain] = self.inputs[idx[plain]]  # each row read once, from the view drawn
        for view in np.unique(drawn[~plain]):
            chosen = drawn == view
            rows[chosen] = self.views[int(view) - 1][idx[chosen]]
        return rows

    def _rows_on_device(
        self, inputs: torch.Tensor, idx: np.ndarray, drawn: np.ndarray | None
    ) -> torch.Tensor:
        at = torch.as_tensor(idx, device=inputs.device)
        rows = inputs[at]
        if self.views is None or drawn is None:
            return rows
        for view in np.unique(drawn[drawn > 0]):
            chosen = torch.as_tensor(np.flatnonzero(drawn == view), device=inputs.device)
            rows[chosen] = self.views[int(view) - 1][at[chosen]]
        return rows

    def to(self, device: torch.device) -> BatchReader:
        def upload(array: Rows) -> torch.Tensor:
            if isinstance(array, torch.Tensor):
                return array.to(device)
            array = np.array(array)  # read whole, once
            if array.dtype == np.uint16:  # bfloat16 bits (cache.py)
                return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16).to(device)
            return torch.from_numpy(array).to(device)

        views = None if self.views is None else upload(self.views)
        return BatchReader(upload(self.inputs), upload(self.labels), self.nhwc, views)

    def __getstate__(self) -> dict[str, Any]:
        return {name: _Mapped.of(value) for name, value in self.__dict__.items()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(
            {
                name: value.open() if isinstance(value, _Mapped) else value
                for name, value in state.items()
            }
        )


def _as_float(rows: Rows) -> torch.Tensor:
    return rows.float() if isinstance(rows, torch.Tensor) else as_float_tensor(rows)


@dataclass(frozen=True)
class _Mapped:
    """A memory-mapped array as its file, to map again in another process."""

    filename: str
    dtype: str
    shape: tuple[int, ...]
    offset: int

    @staticmethod
    def of(value: Any) -> Any:
        if isinstance(value, np.memmap) and value.filename is not None:
            return _Mapped(str(value.filename), value.dtype.str, value.shape, int(value.offset))
        return value

    def open(self) -> np.memmap:
        return np.memmap(self.filename, self.dtype, "r", self.offset, self.shape)


def array_batches(
    inputs: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    nhwc: bool = False,
    views: np.ndarray | None = None,
    rank: int = 0,
    ranks: int = 1,
    window: int = 0,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> ArrayBatches:
    order = BatchOrder(len(labels), batch_size, shuffle, seed, rank, ranks, window)
    return ArrayBatches(inputs, labels, order, nhwc, views, seed, num_workers, pin_memory)
