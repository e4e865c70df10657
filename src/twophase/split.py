"""The seeded, stratified train/val split of the training split; the test split stays as the
index has it (official, or carved by the index stage from a folder of class folders).

The training rows are written in a seeded shuffled order, validation and test in index order."""

from __future__ import annotations

import numpy as np
import pandas as pd

from twophase.datasets import DatasetError


def split_index(index: pd.DataFrame, val_ratio: float, seed: int) -> pd.DataFrame:
    """The index with a `subset` column: train and val carved from split == 'train', plus test."""
    train = index[index["split"] == "train"]
    train_positions, val_positions = _carve(train, val_ratio, seed, "data.val_ratio")
    train_rows, val_rows = train.iloc[train_positions], train.iloc[val_positions]
    # Training rows keep their seeded shuffled order (datasets list their images class by class):
    # any contiguous run of the cache, as finetune.shuffle: blocks reads it, mixes the classes.
    parts = [
        train_rows.assign(subset="train"),
        val_rows.sort_index().assign(subset="val"),
        index[index["split"] == "test"].assign(subset="test"),
    ]
    return pd.concat(parts, ignore_index=True).drop(columns="split")


def _carve(
    rows: pd.DataFrame, ratio: float, seed: int, param: str
) -> tuple[np.ndarray, np.ndarray]:
    """Positions (kept, carved) of a stratified, seeded split of `rows` by `ratio`."""
    counts = rows["label"].value_counts()
    too_small = counts[counts < 2]
    if len(too_small):
        names = rows.drop_duplicates("label").set_index("label").loc[too_small.index, "class_name"]
        raise DatasetError(
            f"{param}: cannot carve a split: class(es) {', '.join(names)} have fewer than 2 "
            "images left to split"
        )
    carved = round(len(rows) * ratio)
    if carved < len(counts) or len(rows) - carved < len(counts):
        raise DatasetError(
            f"{param}: {ratio} gives {carved} and {len(rows) - carved} images, but both sides "
            f"need at least one image of each of the {len(counts)} classes"
        )
    return stratified_split(rows["label"].to_numpy(), carved, seed)


def stratified_split(labels: np.ndarray, n_val: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the training and validation rows: scikit-learn's `train_test_split(...,
    test_size=n_val, stratify=labels, random_state=seed)` step for step (StratifiedShuffleSplit
    with a legacy RandomState; tests/test_split.py compares them), so the split is the one earlier
    versions made, without importing sklearn.model_selection (most of this stage's start-up), and
    a scikit-learn release can no longer move an image between train and val.
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
