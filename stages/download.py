"""DVC stage `download`: fetch the dataset and the pretrained weights; index the images."""

from pathlib import Path

import _src_path  # noqa: F401

from twophase.datasets import build_index, fetch_weights
from twophase.io import write_csv
from twophase.params import load_params
from twophase.stage import run_stage

INDEX = Path("data/index.csv")
RAW = Path("data/raw")  # DVC tracks this folder; data.root may also point elsewhere


def main() -> None:
    params = load_params()
    RAW.mkdir(parents=True, exist_ok=True)
    root = Path(params.data.root)
    if not root.resolve().is_relative_to(RAW.resolve()):
        print(
            f"note: data.root {root} is outside {RAW}: DVC does not see changes to those "
            "images, so run `dvc repro -f download` after changing them"
        )
    print(f"weights: {fetch_weights(params.model.arch, params.model.weights)}")
    index = build_index(params.data.dataset, root)
    write_csv(index, INDEX)
    counts = index["split"].value_counts()
    print(
        f"{params.data.dataset}: {index['label'].nunique()} classes, "
        f"{counts.get('train', 0)} training and {counts.get('test', 0)} test images -> {INDEX}"
    )


if __name__ == "__main__":
    run_stage(main)
