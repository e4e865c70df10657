"""Phase 1 at Oxford-IIIT Pet's size: `python stages/train_transfer.py` on a synthetic cache.

A digits project (bench/startup.py) whose embedding cache is replaced by one of Pet's shape:
2944 train / 736 val / 3669 test rows of 512 features, 37 classes (class means plus noise, so
the head learns something), trained with the reference params (Adam 1e-4, batch 128, 50 epochs,
patience raised so that all 50 run). Prints the stage alone, its training (`wall_seconds`) and
a bare `python -c "import torch"`, each measured `--repeats` times in the same run.

    python bench/pet_phase1.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from startup import project  # noqa: E402

ROWS = {"train": 2944, "val": 736, "test": 3669}
CLASSES, DIM = 37, 512


def pet_sized_cache(embeddings: Path, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, size=(CLASSES, DIM)).astype(np.float32)
    for subset, rows in ROWS.items():
        labels = rng.integers(0, CLASSES, size=rows)
        values = centres[labels] + rng.normal(0, 2.5, size=(rows, DIM)).astype(np.float32)
        np.save(embeddings / f"{subset}_embeddings.npy", values.astype(np.float32))
        np.save(embeddings / f"{subset}_labels.npy", labels.astype(np.int64))
    meta = json.loads((embeddings / "meta.json").read_text())
    meta["class_names"] = [f"class_{i:02d}" for i in range(CLASSES)]
    meta["subsets"] = {subset: {"images": rows} for subset, rows in ROWS.items()}
    (embeddings / "meta.json").write_text(json.dumps(meta, indent=2))


def timed(command: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    subprocess.run(command, cwd=cwd, check=True, capture_output=True)
    return round(time.perf_counter() - start, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/twophase-bench-pet-phase1"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    repo = project(args.workdir)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train_transfer"].update(lr=1e-4, epochs=50, patience=50, batch_size=128)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    pet_sized_cache(repo / "data" / "embeddings")
    python = sys.executable
    rows = []
    for _ in range(args.repeats):
        torch_s = timed([python, "-c", "import torch"], repo)
        stage_s = timed([python, "stages/train_transfer.py"], repo)
        summary = json.loads((repo / "metrics" / "train_transfer.json").read_text())
        rows.append(
            {
                "import torch": torch_s,
                "stage": stage_s,
                "training (wall_seconds)": summary["wall_seconds"],
                "epochs_run": summary["epochs_run"],
                "best_val_acc": summary["best_val_acc"],
            }
        )
        print(rows[-1], flush=True)


if __name__ == "__main__":
    main()
