"""The seeded, stratified train/val split of the official training split; test stays as is."""

from __future__ import annotations

import pandas as pd
from sklearn.model_selection import train_test_split

from twophase.datasets import DatasetError


def split_index(index: pd.DataFrame, val_ratio: float, seed: int) -> pd.DataFrame:
    """The index with a `subset` column: train and val carved from split == 'train', plus test."""
    train = index[index["split"] == "train"]
    counts = train["label"].value_counts()
    too_small = counts[counts < 2]
    if len(too_small):
        names = train.drop_duplicates("label").set_index("label").loc[too_small.index, "class_name"]
        raise DatasetError(
            f"data.val_ratio: cannot carve a validation set: class(es) {', '.join(names)} have "
            "fewer than 2 training images"
        )
    n_val = round(len(train) * val_ratio)
    if n_val < len(counts) or len(train) - n_val < len(counts):
        raise DatasetError(
            f"data.val_ratio: {val_ratio} gives {n_val} validation and {len(train) - n_val} "
            f"training images, but both need at least one image of each of the {len(counts)} "
            "classes"
        )
    train_rows, val_rows = train_test_split(
        train, test_size=n_val, stratify=train["label"], random_state=seed
    )
    parts = [
        train_rows.sort_index().assign(subset="train"),
        val_rows.sort_index().assign(subset="val"),
        index[index["split"] == "test"].assign(subset="test"),
    ]
    return pd.concat(parts, ignore_index=True).drop(columns="split")
