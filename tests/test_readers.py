"""Phase 2's cached batches at device speed, without changing a single value.

Reading processes, arrays held on a device and block shuffling are speed choices: the first two
must give exactly the batches of a plain read; block shuffling must still visit every row once
per epoch while reading the file in runs of whole blocks.
"""

from __future__ import annotations

import gc
import pickle
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from twophase.batches import ArrayBatches, BatchOrder, BatchReader, array_batches


def _cache(tmp_path: Path, rows: int = 50, dtype: str = "<f4") -> tuple[np.ndarray, np.ndarray]:
    """A memory-mapped NHWC activation file and its (K=2) views file, as the features stage."""
    rng = np.random.default_rng(0)
    plain = rng.normal(size=(rows, 2, 2, 3)).astype(dtype)
    views = rng.normal(size=(2 * rows, 2, 2, 3)).astype(dtype)
    np.save(tmp_path / "plain.npy", plain)
    np.save(tmp_path / "views.npy", views)
    return (
        np.load(tmp_path / "plain.npy", mmap_mode="r"),
        np.load(tmp_path / "views.npy", mmap_mode="r").reshape(2, rows, 2, 2, 3),
    )


def _epochs(
    batches: ArrayBatches, epochs: int = 2
) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    seen = []
    for epoch in range(1, epochs + 1):
        batches.set_epoch(epoch)
        seen.append([(x.clone(), y.clone()) for x, y in batches])
    return seen


def _same(a: list, b: list) -> bool:
    return all(
        len(ea) == len(eb)
        and all(
            torch.equal(xa, xb) and torch.equal(ya, yb)
            for (xa, ya), (xb, yb) in zip(ea, eb, strict=True)
        )
        for ea, eb in zip(a, b, strict=True)
    )


@pytest.mark.parametrize("dtype", ["<f4", "<f2"])
def test_reading_processes_and_device_copies_give_the_same_batches(
    tmp_path: Path, dtype: str
) -> None:
    plain, views = _cache(tmp_path, dtype=dtype)
    labels = np.arange(len(plain)) % 3

    def make(**speed: int) -> ArrayBatches:
        order = BatchOrder(len(labels), 8, shuffle=True, seed=3)
        return ArrayBatches(plain, labels, order, nhwc=True, views=views, seed=3, **speed)

    reference = _epochs(make())
    assert _same(_epochs(make(num_workers=2)), reference)
    assert _same(_epochs(make().resident(torch.device("cpu"))), reference)
    assert reference[0][0][0].shape == (8, 3, 2, 2) and reference[0][0][0].dtype == torch.float32


def test_reading_processes_stop_when_their_batches_are_dropped(tmp_path: Path) -> None:
    """Dropping the batches stops their reading processes at once (no cycle left for the
    cyclic collector, which may close the workers' queues first: each worker is then waited
    for five seconds and killed, at the end of every phase run with compute.num_workers)."""
    plain, _ = _cache(tmp_path)
    others = set(psutil.Process().children())  # e.g. the end-to-end tests' stage server
    batches = array_batches(plain, np.arange(len(plain)) % 3, 8, num_workers=2)
    _epochs(batches)
    next(iter(batches))  # and an epoch left part-way (an lr-find, an error)
    workers = set(psutil.Process().children()) - others
    assert len(workers) == 2
    gc.disable()  # only reference counting may free them
    try:
        del batches
        assert not [w for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE]
    finally:
        gc.enable()


def test_a_memory_mapped_reader_travels_by_file_name(tmp_path: Path) -> None:
    plain, views = _cache(tmp_path, rows=2000)
    reader = BatchReader(plain, np.zeros(len(plain)), True, views)
    travelled = pickle.dumps(reader)
    assert len(travelled) < 20_000 < plain.nbytes, "the arrays were copied, not re-mapped"
    again = pickle.loads(travelled)
    assert isinstance(again.inputs, np.memmap) and again.views.shape == views.shape
    key = (np.array([1, 5, 7]), np.array([0, 2, 1]))
    assert torch.equal(again[key][0], reader[key][0])


def test_block_shuffle_visits_every_row_once_in_runs_of_whole_blocks() -> None:
    size, batch, window = 1000, 16, 4
    order = BatchOrder(size, batch, shuffle=True, seed=1, window=window)
    epochs = [np.concatenate(list(order)) for _ in range(2)]
    for rows in epochs:
        assert sorted(rows.tolist()) == list(range(size)), "every row once per epoch"
    assert not np.array_equal(epochs[0], epochs[1]), "a new order each epoch"
    again = BatchOrder(size, batch, shuffle=True, seed=1, window=window)
    assert np.array_equal(np.concatenate(list(again)), epochs[0]), "seeded"
    for batch_rows in BatchOrder(size, batch, shuffle=True, seed=1, window=window):
        assert len(set((batch_rows // batch).tolist())) <= window, "rows of at most `window` blocks"
    groups = [epochs[0][i : i + batch * window] for i in range(0, size, batch * window)]
    assert all(len(set((g // batch).tolist())) <= window for g in groups)


def test_full_shuffle_is_unchanged_by_the_new_options() -> None:
    """The default order is the one earlier results were computed with."""
    old = np.random.default_rng(5)
    expected = [
        np.sort(p) for perm in (old.permutation(40), old.permutation(40)) for p in np.split(perm, 5)
    ]
    order = BatchOrder(40, 8, shuffle=True, seed=5)
    got = [b for _ in range(2) for b in order]
    assert all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))


def test_ranks_split_every_global_batch_into_contiguous_slices() -> None:
    whole = list(BatchOrder(18, 7, shuffle=True, seed=2))
    parts = [list(BatchOrder(18, 7, shuffle=True, seed=2, rank=r, ranks=2)) for r in range(2)]
    for batch, first, second in zip(whole, *parts, strict=True):
        assert np.array_equal(np.concatenate([first, second]), batch)
        assert abs(len(first) - len(second)) <= 1
    batches = array_batches(np.zeros((18, 1), np.float32), np.zeros(18), 7, rank=1, ranks=2)
    assert [len(y) for _, y in batches] == [3, 3, 2]


def test_writing_the_cache_keeps_the_process_memory_flat(tmp_path: Path) -> None:
    """256 MiB written through NpyRows (as every rank writes its rows) must not stay resident in
    the writer, as the pages of a filled writable memory map would."""
    code = f"""
import resource, sys, torch
sys.path.insert(0, {str(Path(__file__).resolve().parent.parent / "src")!r})
from pathlib import Path
from twophase.cache import NpyRows
batch = torch.ones(64, 1024, 4)  # 1 MiB of float32
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
rows = NpyRows(Path({str(tmp_path / "big.npy")!r}), 64 * 256, (1024, 4))
for i in range(256):
    rows.write(64 * i, batch)
rows.close()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    grown_mib = float(done.stdout.strip().splitlines()[-1])
    assert grown_mib < 64, f"peak RSS grew by {grown_mib:.0f} MiB while writing 256 MiB"
    assert np.load(tmp_path / "big.npy", mmap_mode="r")[-1, -1, -1] == 1.0


def test_a_training_cache_larger_than_memory_is_warned_about(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import sys

    from twophase.phases import available_memory, warn_if_larger_than_memory

    available = available_memory()
    assert available is None or available > 0
    if sys.platform == "linux":
        assert available is not None, "/proc/meminfo was not read"
    warn_if_larger_than_memory(2**62)
    warned = "is larger than the free memory" in capsys.readouterr().out
    assert warned is (available is not None)
    warn_if_larger_than_memory(0)
    assert capsys.readouterr().out == ""
