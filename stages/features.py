"""DVC stage `features`: run the frozen part of the network once per image and cache it."""

from pathlib import Path

import _src_path  # noqa: F401

from twophase.datasets import read_index
from twophase.features import extract_features
from twophase.params import load_params
from twophase.stage import run_stage

SPLIT = Path("data/split.csv")
FEATURES = Path("data/features")


def main() -> None:
    params = load_params()
    meta = extract_features(params, read_index(SPLIT), FEATURES)
    print(f"cached the input of {meta['cut']} and the pooled embedding -> {FEATURES}")


if __name__ == "__main__":
    run_stage(main)
