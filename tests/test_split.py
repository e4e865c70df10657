"""The split is scikit-learn's stratified train_test_split, reproduced without importing it."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.model_selection import train_test_split

from twophase.split import split_index, stratified_split


@pytest.mark.parametrize(
    ("counts", "n_val", "seed"),
    [
        ([50, 50, 50], 30, 42),
        ([7, 13, 2, 40, 5], 17, 0),  # uneven classes: remainders and ties decide
        ([3] * 37, 37, 1),  # Pet-like: as many val rows as classes
        ([100, 99, 98, 97, 96, 95, 94], 136, 123),
    ],
)
def test_positions_equal_scikit_learns(counts: list[int], n_val: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(len(counts)), counts))
    positions = np.arange(len(labels))
    expected_train, expected_val = train_test_split(
        positions, test_size=n_val, stratify=labels, random_state=seed
    )
    train, val = stratified_split(labels, n_val, seed)
    assert np.array_equal(train, expected_train)
    assert np.array_equal(val, expected_val)


def test_split_index_keeps_test_and_stratifies_the_rest() -> None:
    labels = np.repeat([0, 1, 2], [40, 20, 10])
    index = pd.DataFrame(
        {
            "path": [f"img{i}.png" for i in range(len(labels) + 5)],
            "label": np.concatenate([labels, [0, 1, 2, 0, 1]]),
            "class_name": "c",
            "split": ["train"] * len(labels) + ["test"] * 5,
        }
    )
    split = split_index(index, 0.2, seed=3)
    assert (split["subset"] == "test").sum() == 5
    val = split[split["subset"] == "val"]
    assert val["label"].value_counts().sort_index().tolist() == [8, 4, 2]
    assert split_index(index, 0.2, seed=3).equals(split)
    assert not split_index(index, 0.2, seed=4).equals(split)
