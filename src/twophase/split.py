"""The seeded, stratified train/val split of the official training split; test stays as is.

The training rows are written in a seeded shuffled order, validation and test in index order."""

from __future__ import annotations

import numpy as np
import pandas as pd

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
    train_positions, val_positions = stratified_split(train["label"].to_numpy(), n_val, seed)
    train_rows, val_rows = train.iloc[train_positions], train.iloc[val_positions]
    # Training rows keep their seeded shuffled order (datasets list their images class by class):
    # any contiguous run of the cache, as finetune.shuffle: blocks reads it, mixes the classes.
    parts = [
        train_rows.assign(subset="train"),
        val_rows.sort_index().assign(subset="val"),
        index[index["split"] == "test"].assign(subset="test"),
    ]
    return pd.concat(parts, ignore_index=True).drop(columns="split")


def stratified_split(labels: np.ndarray, n_val: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the training and validation rows: scikit-learn's `train_test_split(...,
    test_size=n_val, stratify=labels, random_state=seed)` step for step (StratifiedShuffleSplit
    with a legacy RandomState; tests/test_split.py compares them), so the split is the one earlier
    versions made. Importing sklearn.model_selection cost this stage 0.8 s of its 1.4 s, and a
    scikit-learn release can no longer move an image between train and val.
    """
    rng = np.random.RandomState(seed)
    _, class_of_row = np.unique(labels, return_inverse=True)
    class_counts = np.bincount(class_of_row)
    rows_by_class = np.split(
        np.argsort(class_of_row, kind="mergesort"), np.cumsum(class_counts)[:-1]
    )
    n_train = len(labels) - n_val
    train_per_class = _approximate_mode(class_counts, n_train, rng)
    val_per_class = _approximate_mode(class_counts - train_per_class, n_val, rng)
    train: list[int] = []
    val: list[int] = []
    for rows, n_train_i, n_val_i in zip(rows_by_class, train_per_class, val_per_class, strict=True):
        shuffled = rows.take(rng.permutation(len(rows)), mode="clip")
        train.extend(shuffled[:n_train_i])
        val.extend(shuffled[n_train_i : n_train_i + n_val_i])
    return rng.permutation(train), rng.permutation(val)


def _approximate_mode(
    class_counts: np.ndarray, n_draws: int, rng: np.random.RandomState
) -> np.ndarray:
    """How many of `n_draws` each class gets: proportional, the remainders' largest first, ties
    drawn at random (scikit-learn's `_approximate_mode`)."""
    continuous = class_counts / class_counts.sum() * n_draws
    floored = np.floor(continuous)
    need_to_add = int(n_draws - floored.sum())
    if need_to_add > 0:
        remainder = continuous - floored
        for value in np.sort(np.unique(remainder))[::-1]:
            (tied,) = np.where(remainder == value)
            add_now = min(len(tied), need_to_add)
            floored[rng.choice(tied, size=add_now, replace=False)] += 1
            need_to_add -= add_now
            if need_to_add == 0:
                break
    counts: np.ndarray = floored.astype(int)
    return counts
