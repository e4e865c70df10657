"""DVC stage `split`: seeded, stratified train/val split of the official training split."""

from pathlib import Path

import _src_path  # noqa: F401

from twophase.datasets import read_index
from twophase.io import write_csv
from twophase.params import load_params
from twophase.split import split_index
from twophase.stage import run_stage

INDEX = Path("data/index.csv")
SPLIT = Path("data/split.csv")


def main() -> None:
    params = load_params()
    split = split_index(read_index(INDEX), params.data.val_ratio, params.seed)
    write_csv(split, SPLIT)
    counts = split["subset"].value_counts()
    print(f"train {counts['train']}, val {counts['val']}, test {counts['test']} -> {SPLIT}")


if __name__ == "__main__":
    run_stage(main)
