"""DVC stage `train_transfer`: phase 1, the new head on the cached embeddings."""

from pathlib import Path

import _src_path  # noqa: F401

from twophase.distributed import setup, teardown
from twophase.io import write_json
from twophase.params import load_params
from twophase.phases import train_transfer
from twophase.stage import run_stage

EMBEDDINGS = Path("data/embeddings")
CHECKPOINT = Path("models/transfer.pt")
METRICS = Path("metrics/train_transfer.json")
HISTORY = Path("plots/train_transfer/history.csv")


def main() -> None:
    params = load_params()
    world = setup(params.device)
    result = train_transfer(params, EMBEDDINGS, CHECKPOINT, HISTORY, world)
    teardown()
    if not world.is_main:
        return
    write_json(result.summary(), METRICS)
    print(f"best epoch {result.best_epoch} (val acc {result.best_val_acc:.4f}) -> {CHECKPOINT}")


if __name__ == "__main__":
    run_stage(main, batch_size_param="train_transfer.batch_size", distributed=True)
