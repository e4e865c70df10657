"""DVC stage `index`: one row per image (path, label, class name, official split)."""

from pathlib import Path

import _src_path  # noqa: F401

from twophase.datasets import build_index
from twophase.io import write_csv
from twophase.params import load_params
from twophase.stage import run_stage

DOWNLOADS = Path("data/downloads")
INDEX = Path("data/index.csv")


def main() -> None:
    params = load_params()
    data = params.data
    index = build_index(data.dataset, Path(data.root), DOWNLOADS, test_ratio=data.test_ratio)
    write_csv(index, INDEX)
    counts = index["split"].value_counts()
    print(
        f"{params.data.dataset}: {index['label'].nunique()} classes, "
        f"{counts.get('train', 0)} training and {counts.get('test', 0)} test images -> {INDEX}"
    )


if __name__ == "__main__":
    run_stage(main)
