"""Run by tests/test_distributed.py under torchrun (or alone): features, phase 1, phase 2 and the
evaluation of a tiny imagefolder into OUT, as the stages do, with this process's share of the
work.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/distributed_worker.py \
        SPLIT_CSV '[["OUT", PARAMS], ...]'

Several runs go one after the other in one process (or one torchrun): each phase seeds itself.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from twophase.datasets import read_index
from twophase.distributed import setup, teardown
from twophase.evaluation import evaluate
from twophase.features import extract_features
from twophase.params import Params, parse_params
from twophase.phases import finetune, train_transfer


def main() -> None:
    split_csv, runs = Path(sys.argv[1]), json.loads(sys.argv[2])
    split = read_index(split_csv)
    for out, raw in runs:  # one after the other: each phase seeds itself
        run(split, Path(out), parse_params(raw))


def run(split: pd.DataFrame, out: Path, params: Params) -> None:
    world = setup(params.device)
    extract_features(params, split, out / "embeddings", out / "activations", world, out / "tta")
    train_transfer(params, out / "embeddings", out / "t.pt", out / "t.csv", world)
    world.barrier()  # separate stages in the pipeline: phase 2 reads what rank 0 wrote
    finetune(params, out / "activations", out / "t.pt", out / "f.pt", out / "f.csv", split, world)
    world.barrier()
    if world.is_main:
        checkpoints = {"transfer": out / "t.pt", "finetune": out / "f.pt"}
        evaluate(
            params,
            out / "embeddings",
            out / "activations",
            split,
            checkpoints,
            out / "evaluate.json",
            out / "evaluate",
            out / "tta",
        )


if __name__ == "__main__":
    main()
    teardown()
