"""DVC stage `finetune`: phase 2, the unfrozen blocks and the head on the cached activations
(or on the training images themselves, streamed: finetune.input: images)."""

from pathlib import Path

import _src_path  # noqa: F401

from twophase.datasets import read_index
from twophase.distributed import setup, teardown
from twophase.io import write_json
from twophase.params import load_params
from twophase.phases import finetune, finetune_summary
from twophase.stage import run_stage

SPLIT = Path("data/split.csv")
ACTIVATIONS = Path("data/activations")
TRANSFER = Path("models/transfer.pt")
CHECKPOINT = Path("models/finetune.pt")
METRICS = Path("metrics/finetune.json")
HISTORY = Path("plots/finetune/history.csv")


def main() -> None:
    params = load_params()
    split = read_index(SPLIT) if params.finetune.input == "images" else None
    world = setup(params.device)
    result = finetune(params, ACTIVATIONS, TRANSFER, CHECKPOINT, HISTORY, split, world)
    teardown()
    if not world.is_main:
        return
    write_json(finetune_summary(result), METRICS)
    print(f"best epoch {result.best_epoch} (val acc {result.best_val_acc:.4f}) -> {CHECKPOINT}")


if __name__ == "__main__":
    run_stage(main, batch_size_param="finetune.batch_size", distributed=True)
