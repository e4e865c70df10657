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


def _classes_per_batch(labels: np.ndarray, window: int, batch_size: int = 128) -> float:
    from twophase.batches import BatchOrder

    order = BatchOrder(len(labels), batch_size, shuffle=True, seed=0, window=window)
    return float(np.mean([len(np.unique(labels[batch])) for batch in order]))


@pytest.mark.parametrize(
    ("classes", "per_class"),
    [(37, 100), (101, 750)],  # Oxford-IIIT Pet's and Food-101's training lists, class by class
    ids=["pet", "food101"],
)
def test_block_shuffled_batches_mix_classes_almost_as_a_full_shuffle(
    classes: int, per_class: int
) -> None:
    """finetune.shuffle: blocks reads the cache in runs of consecutive rows: the training rows
    must be stored shuffled, or a batch holds a handful of classes."""
    labels = np.repeat(np.arange(classes), per_class)  # as torchvision lists them
    index = pd.DataFrame(
        {
            "path": [f"img{i}.jpg" for i in range(len(labels))],
            "label": labels,
            "class_name": [f"c{label}" for label in labels],
            "split": "train",
        }
    )
    split = split_index(index, 0.2, 42)
    train = split[split["subset"] == "train"]["label"].to_numpy()
    blocks, full = _classes_per_batch(train, window=8), _classes_per_batch(train, window=0)
    assert blocks >= 0.8 * full, (blocks, full)


def test_the_training_order_is_seeded_and_the_other_subsets_keep_the_index_order() -> None:
    labels = np.repeat(np.arange(4), 10)
    index = pd.DataFrame(
        {
            "path": [f"{i}.jpg" for i in range(40)],
            "label": labels,
            "class_name": "c",
            "split": "train",
        }
    )
    index.loc[36:, "split"] = "test"
    a, b = split_index(index, 0.25, 1), split_index(index, 0.25, 1)
    assert a.equals(b)
    val, test = a[a["subset"] == "val"], a[a["subset"] == "test"]
    assert val["path"].tolist() == sorted(val["path"], key=lambda p: int(p[:-4]))
    assert test["path"].tolist() == ["36.jpg", "37.jpg", "38.jpg", "39.jpg"]
