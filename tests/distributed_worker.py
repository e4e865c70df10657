"""Run by tests/test_distributed.py under torchrun (or alone): features, phase 1 and phase 2 of
a tiny imagefolder into OUT, as the stages do, with this process's share of the work.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/distributed_worker.py \
        SPLIT_CSV OUT PARAMS_JSON
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import pandas as pd

from twophase.distributed import setup, teardown
from twophase.features import extract_features
from twophase.params import parse_params
from twophase.phases import finetune, train_transfer


def main() -> None:
    split_csv, out, raw = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
    params = parse_params(raw)
    split = pd.read_csv(split_csv)
    world = setup(params.device)
    extract_features(params, split, out / "embeddings", out / "activations", world)
    train_transfer(params, out / "embeddings", out / "t.pt", out / "t.csv", world)
    world.barrier()  # separate stages in the pipeline: phase 2 reads what rank 0 wrote
    finetune(params, out / "activations", out / "t.pt", out / "f.pt", out / "f.csv", split, world)
    teardown()


if __name__ == "__main__":
    main()
