"""Phase-2 losses with the activation cache in float16 / bfloat16 against float32.

    python bench/cache_dtype.py            # digits at 32 px and synthetic photos at 224 px

Runs, in-process, features -> train_transfer -> finetune once per dtype on the same split and
prints the largest difference of any phase-2 train/val loss from the float32 run, and the
cache size. Figures: bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from synth import make_imagefolder

from twophase.datasets import build_index, fetch_dataset
from twophase.features import extract_features
from twophase.params import parse_params
from twophase.phases import finetune, train_transfer
from twophase.split import split_index

DTYPES = ("float32", "float16", "bfloat16")


def run(index: pd.DataFrame, size: int, dtype: str, work: Path) -> tuple[pd.DataFrame, int]:
    params = parse_params(
        {
            "device": "cpu",
            "data": {"dataset": "imagefolder", "image_size": size},
            "model": {"weights": "none"},
            "features": {"num_workers": 0, "dtype": dtype},
            "train_transfer": {"lr": 0.001, "epochs": 10},
            "finetune": {"lr": 0.0003, "epochs": 5, "patience": 10},
        }
    )
    split = split_index(index, params.data.val_ratio, params.seed)
    extract_features(params, split, work / "embeddings", work / "activations")
    train_transfer(params, work / "embeddings", work / "transfer.pt", work / "t.csv")
    finetune(params, work / "activations", work / "transfer.pt", work / "f.pt", work / "f.csv")
    size_bytes = sum(p.stat().st_size for p in (work / "activations").glob("*_activations.npy"))
    return pd.read_csv(work / "f.csv"), size_bytes


def compare(name: str, index: pd.DataFrame, size: int, work: Path) -> None:
    histories = {dtype: run(index, size, dtype, work / dtype) for dtype in DTYPES}
    reference, ref_bytes = histories["float32"]
    for dtype, (history, size_bytes) in histories.items():
        gaps = (history[["train_loss", "val_loss"]] - reference[["train_loss", "val_loss"]]).abs()
        print(
            f"{name}: {dtype:9s} |phase-2 loss - float32|: starting weights (eval) "
            f"{gaps.iloc[0].max():.1e}, first epoch {gaps.iloc[1].max():.1e}, "
            f"worst of {len(gaps) - 1} epochs {gaps.to_numpy().max():.1e}; "
            f"activations {size_bytes / 2**20:.1f} MiB ({size_bytes / ref_bytes:.2f}x)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=200, help="synthetic photos at 224 px")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        fetch_dataset("digits", work, work / "downloads")
        compare("digits 32 px", build_index("digits", work, work / "downloads"), 32, work / "d")
        photos = make_imagefolder(work / "photos", args.photos)
        compare("photos 224 px", build_index("imagefolder", photos), 224, work / "p")


if __name__ == "__main__":
    main()
