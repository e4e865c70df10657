"""DVC stage `download`: fetch the pretrained weights and, where needed, the dataset.

data.root is the user's folder: this stage only reads it. Whatever it fetches or exports goes
to data/downloads, a folder no one else writes.
"""

from pathlib import Path

import _src_path  # noqa: F401

from twophase.datasets import fetch_dataset, fetch_weights
from twophase.params import load_params
from twophase.stage import run_stage

DOWNLOADS = Path("data/downloads")


def main() -> None:
    params = load_params()
    print(f"weights: {fetch_weights(params.model.arch, params.model.weights)}")
    where = fetch_dataset(params.data.dataset, Path(params.data.root), DOWNLOADS)
    if where is not None:
        print(f"{params.data.dataset}: read from {where}")


if __name__ == "__main__":
    run_stage(main)
