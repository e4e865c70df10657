"""DVC stage `features`: run the frozen part of the network once per image and cache it."""

from pathlib import Path

import _src_path  # noqa: F401

from twophase.datasets import read_index
from twophase.distributed import setup, teardown
from twophase.features import extract_features
from twophase.params import load_params
from twophase.stage import run_stage

SPLIT = Path("data/split.csv")
EMBEDDINGS = Path("data/embeddings")
ACTIVATIONS = Path("data/activations")
TTA = Path("data/tta")


def main() -> None:
    params = load_params()
    world = setup(params.device)
    meta = extract_features(params, read_index(SPLIT), EMBEDDINGS, ACTIVATIONS, world, TTA)
    teardown()
    if not world.is_main:
        return
    print(f"cached the pooled embeddings -> {EMBEDDINGS}")
    print(
        f"cached the input of {meta['cut'] or 'the network (every block trains)'} -> {ACTIVATIONS}"
    )
    if params.evaluate.tta == "flip":
        print(f"cached both of them on the mirrored val and test images -> {TTA}")


if __name__ == "__main__":
    run_stage(main, batch_size_param="features.batch_size", distributed=True)
