"""Phase 2's input from a cache the page cache does not hold: samples/s of each way to read it.

Writes a float32 NHWC activation file (ResNet18's layer4 input at 224 px, 196 KiB per row) and,
with the page cache dropped before every run (needs root: /proc/sys/vm/drop_caches), so that
every byte comes from the disk as it would from a cache larger than memory, times
  - the floor: the file read front to back in 64 MiB chunks;
  - one epoch of batches in a full random permutation (finetune.shuffle: full);
  - one epoch of block-shuffled batches (finetune.shuffle: blocks);
each in the main process and with reading processes (compute.num_workers). Reading only: no
model runs, so the figures say whether the reader could keep a GPU fed.

    python bench/reader.py --gib 4 --json /tmp/reader.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from twophase.batches import ArrayBatches, BatchOrder
from twophase.phases import BLOCK_WINDOW

ROW = (14, 14, 256)


def drop_page_cache() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def write_cache(path: Path, rows: int) -> None:
    if path.exists() and np.load(path, mmap_mode="r").shape[0] == rows:
        return
    header = {"descr": "<f4", "fortran_order": False, "shape": (rows, *ROW)}
    chunk = np.random.default_rng(0).normal(size=(256, *ROW)).astype("<f4").tobytes()
    with path.open("wb") as handle:
        np.lib.format.write_array_header_2_0(handle, header)
        for start in range(0, rows, 256):
            handle.write(chunk[: min(256, rows - start) * int(np.prod(ROW)) * 4])


def sequential_floor(path: Path) -> float:
    drop_page_cache()
    start = time.perf_counter()
    with path.open("rb", buffering=0) as handle:
        buffer = bytearray(64 * 2**20)
        while handle.readinto(buffer):
            pass
    return time.perf_counter() - start


def epoch(path: Path, batch: int, window: int, workers: int, max_batches: int) -> tuple[float, int]:
    activations = np.load(path, mmap_mode="r")
    labels = np.zeros(len(activations), dtype=np.int64)
    order = BatchOrder(len(labels), batch, shuffle=True, seed=0, window=window)
    batches = ArrayBatches(activations, labels, order, nhwc=True, num_workers=workers)
    drop_page_cache()
    start, seen = time.perf_counter(), 0
    for count, (inputs, _) in enumerate(batches, 1):
        seen += len(inputs)
        if count == max_batches:
            break
    seconds = time.perf_counter() - start
    del batches  # its reading processes end here, not inside the next run's
    gc.collect()
    return seconds, seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gib", type=float, default=4.0)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--max-batches", type=int, default=60, help="per run (random reads are slow)"
    )
    parser.add_argument("--path", type=Path, default=Path("/tmp/twophase-reader/activations.npy"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    row_bytes = int(np.prod(ROW)) * 4
    rows = int(args.gib * 2**30 // row_bytes)
    args.path.parent.mkdir(parents=True, exist_ok=True)
    write_cache(args.path, rows)
    size = args.path.stat().st_size
    floor_s = sequential_floor(args.path)
    results: dict[str, object] = {
        "file_gib": round(size / 2**30, 2),
        "rows": rows,
        "sequential_floor_rows_per_s": round(rows / floor_s, 1),
        "sequential_floor_mib_per_s": round(size / 2**20 / floor_s, 1),
    }
    print(json.dumps(results), flush=True)
    for name, window in (("full shuffle", 0), (f"blocks (window {BLOCK_WINDOW})", BLOCK_WINDOW)):
        for workers in (0, args.workers):
            seconds, seen = epoch(args.path, args.batch, window, workers, args.max_batches)
            key = f"{name}, {workers} reading processes"
            results[key] = {"rows_per_s": round(seen / seconds, 1), "rows": seen}
            print(key, results[key], flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
