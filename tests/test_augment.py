"""Augmentation at cache speed: cached views (features.views) and streamed images (finetune.input).

Mechanisms only, never accuracy on tiny data: views differ from each other and from the plain
view, the same seed gives the same views, every epoch draws a new mixture, and streamed
phase 2 without augmentation computes what the cached path does.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import pytest
import torch

from tests.helpers import make_imagefolder
from tests.test_phases import tiny_params
from twophase import cache, features
from twophase.batches import ArrayBatches, BatchOrder
from twophase.datasets import build_index
from twophase.images import DrawOrder, ImageBatches, ImageDataset
from twophase.model import Preprocessing
from twophase.params import ParamsError, PhaseParams, parse_params
from twophase.phases import finetune, train_transfer
from twophase.split import split_index
from twophase.train import fit

AUGMENT = ("random_resized_crop", "horizontal_flip")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("augment")
    make_imagefolder(root / "images", classes=("a", "b", "c"), train=8, test=3)
    split = split_index(build_index("imagefolder", root / "images"), 0.25, 42)
    split.to_csv(root / "split.csv", index=False)
    return root


def _split(folder: Path) -> pd.DataFrame:
    return pd.read_csv(folder / "split.csv")


def _cache(folder: Path, name: str, seed: int = 42, **sections: dict) -> tuple[Path, Path]:
    """Extract the features of `folder` with the given params overrides, once per name."""
    embeddings, activations = folder / name / "embeddings", folder / name / "activations"
    if not embeddings.exists():
        params = dataclasses.replace(tiny_params(**sections), seed=seed)
        features.extract_features(params, _split(folder), embeddings, activations)
    return embeddings, activations


def test_augmented_images_differ_from_the_plain_view_and_repeat_with_the_seed(
    folder: Path,
) -> None:
    paths = sorted(str(p) for p in (folder / "images" / "train").rglob("*.jpg"))
    data = ImageDataset(paths, [0] * len(paths), 32, Preprocessing(), AUGMENT, seed=1)
    plain, view1, view2 = data[0][0], data[(0, 0, 1)][0], data[(0, 0, 2)][0]
    assert plain.shape == view1.shape == (3, 32, 32)
    assert not torch.allclose(view1, plain) and not torch.allclose(view1, view2)
    rng_before = torch.get_rng_state()
    assert torch.equal(data[(0, 0, 1)][0], view1), "the same key gives the same pixels"
    assert torch.equal(torch.get_rng_state(), rng_before), "the caller's RNG is untouched"
    other_seed = ImageDataset(paths, [0] * len(paths), 32, Preprocessing(), AUGMENT, seed=2)
    assert not torch.allclose(other_seed[(0, 0, 1)][0], view1)
    no_augment = ImageDataset(paths, [0] * len(paths), 32, Preprocessing())
    assert torch.equal(no_augment[(0, 0, 1)][0], plain), "no augmentation: the eval view"


@pytest.mark.parametrize("name", ["rand_augment", "random_erasing"])
def test_each_policy_changes_images_the_same_way_for_the_same_key(folder: Path, name: str) -> None:
    """Alone in data.augment (no crop, no flip), the policy is all that moves the pixels."""
    paths = sorted(str(p) for p in (folder / "images" / "train").rglob("*.jpg"))[:4]
    data = ImageDataset(paths, [0] * 4, 32, Preprocessing(), [name], seed=1)
    keys = [(i, 0, draw) for i in range(4) for draw in (1, 2, 3)]
    views = {key: data[key][0] for key in keys}
    changed = [key for key in keys if not torch.equal(views[key], data[key[0]][0])]
    assert len(changed) >= len(keys) // 3, f"{name} changed {len(changed)} of {len(keys)} views"
    assert all(torch.equal(data[key][0], views[key]) for key in keys), "the same key, the same"
    other_seed = ImageDataset(paths, [0] * 4, 32, Preprocessing(), [name], seed=2)
    assert any(not torch.equal(other_seed[key][0], views[key]) for key in keys)
    parse_params({"data": {"augment": [name]}, "features": {"views": 2}})


def test_random_erasing_zeroes_a_rectangle_of_the_normalised_image(folder: Path) -> None:
    """Erased after normalisation, a pixel is 0 (the mean) in every channel; erased before, it
    would be -mean/std there."""
    paths = sorted(str(p) for p in (folder / "images" / "train").rglob("*.jpg"))[:4]
    data = ImageDataset(paths, [0] * 4, 32, Preprocessing(), ["random_erasing"], seed=1)
    erased = 0
    for i in range(4):
        for draw in range(1, 6):
            view, plain = data[(i, 0, draw)][0], data[i][0]
            moved = (view != plain).any(0)
            if not moved.any():
                continue
            erased += 1
            rows, cols = moved.any(1).nonzero(), moved.any(0).nonzero()
            box = view[
                :, int(rows.min()) : int(rows.max()) + 1, int(cols.min()) : int(cols.max()) + 1
            ]
            assert torch.equal(box, torch.zeros_like(box))
    assert erased >= 5, erased


def test_policies_run_before_normalisation_and_erasing_after_whatever_the_order() -> None:
    from twophase.images import train_transform

    def steps(augment: list[str]) -> list[str]:
        transform = train_transform(32, Preprocessing(), augment)
        return [type(step).__name__ for step in transform.transforms]  # type: ignore[attr-defined]

    assert steps(["random_erasing", "rand_augment", "horizontal_flip"]) == [
        "PILToTensor",
        "Resize",
        "CenterCrop",
        "RandomHorizontalFlip",
        "RandAugment",
        "ToDtype",
        "Normalize",
        "RandomErasing",
    ]
    # the default draws what it drew before the policies existed: nothing added to its steps
    assert steps(list(AUGMENT)) == [
        "PILToTensor",
        "RandomResizedCrop",
        "RandomHorizontalFlip",
        "ToDtype",
        "Normalize",
    ]


def test_cached_views_are_written_for_the_training_split_only(folder: Path) -> None:
    embeddings, activations = _cache(folder, "views2", features={"views": 2})
    plain, labels = cache.load_embeddings(embeddings, "train")
    views = cache.load_views(embeddings, "embeddings")
    act_views = cache.load_views(activations, "activations")
    assert views is not None and act_views is not None
    assert views.shape == (2, len(labels), plain.shape[1])
    assert act_views.shape == (2, len(labels), 2, 2, 256)
    assert not np.allclose(views[0], plain) and not np.allclose(views[0], views[1])
    assert not list(embeddings.glob("val_views*")) and not list(embeddings.glob("test_views*"))
    meta = cache.load_meta(embeddings)
    assert meta["views"] == 2 and meta["augment"] == list(AUGMENT)

    default_embeddings, _ = _cache(folder, "views0")
    assert cache.load_views(default_embeddings, "embeddings") is None
    assert np.array_equal(cache.load_embeddings(default_embeddings, "train")[0], plain)
    assert "views" not in cache.load_meta(default_embeddings)


def test_the_same_seed_caches_the_same_views_and_another_seed_others(folder: Path) -> None:
    """(With weights: none the seed also draws the untrained weights; the seed's effect on the
    augmentation alone is tested on the images above.)"""
    first, _ = _cache(folder, "views2", features={"views": 2})
    again, _ = _cache(folder, "views2-again", features={"views": 2})
    other, _ = _cache(folder, "views2-seed7", seed=7, features={"views": 2})
    name = "train_views_embeddings.npy"
    assert (first / name).read_bytes() == (again / name).read_bytes()
    assert not np.allclose(np.load(first / name), np.load(other / name))


def test_each_epoch_draws_a_new_mixture_of_views_seeded_by_the_epoch() -> None:
    count = 64
    plain = np.zeros((count, 1), dtype=np.float32)
    views = np.stack([np.full((count, 1), v, dtype=np.float32) for v in (1, 2, 3)])
    labels = np.arange(count)

    def drawn(epoch: int, seed: int = 5) -> np.ndarray:
        batches = ArrayBatches(
            plain, labels, BatchOrder(count, 16, True, seed), views=views, seed=seed
        )
        batches.set_epoch(epoch)
        rows = {int(y): float(x) for xs, ys in batches for x, y in zip(xs[:, 0], ys, strict=True)}
        return np.array([rows[i] for i in range(count)])

    epoch1, epoch2 = drawn(1), drawn(2)
    assert set(np.unique(epoch1)) == {0.0, 1.0, 2.0, 3.0}, "every view, the plain one included"
    assert not np.array_equal(epoch1, epoch2), "a new mixture each epoch"
    assert np.array_equal(epoch1, drawn(1)), "the same (seed, epoch), the same mixture"
    assert not np.array_equal(epoch1, drawn(1, seed=6))


def test_fit_names_every_epoch_to_the_training_batches() -> None:
    class Recording(ArrayBatches):
        epochs: ClassVar[list[int]] = []

        def set_epoch(self, epoch: int) -> None:
            self.epochs.append(epoch)
            super().set_epoch(epoch)

    x = torch.randn(32, 4).numpy()
    y = (x[:, 0] > 0).astype(np.int64)
    train = Recording(x, y, BatchOrder(32, 8, True))
    fit(
        torch.nn.Linear(4, 2),
        (train, ArrayBatches(x, y, BatchOrder(32, 8, False))),
        PhaseParams(lr=1e-2, epochs=3, patience=5),
        device=CPU,
        start_epoch=9,
    )
    assert train.epochs == [9, 10, 11, 12]


def test_streamed_images_draw_a_new_augmentation_every_epoch(folder: Path) -> None:
    paths = sorted(str(p) for p in (folder / "images" / "train").rglob("*.jpg"))[:4]
    data = ImageDataset(paths, [0] * 4, 32, Preprocessing(), AUGMENT, seed=3)
    batches = ImageBatches(data, DrawOrder(BatchOrder(4, 4, False), 1))
    batches.set_epoch(1)
    first = next(iter(batches))[0]
    batches.set_epoch(2)
    second = next(iter(batches))[0]
    batches.set_epoch(1)
    assert torch.equal(next(iter(batches))[0], first)
    assert not torch.allclose(first, second)


def test_phase_one_trains_on_the_views_and_phase_two_streams_equal_to_the_cache(
    folder: Path, tmp_path: Path
) -> None:
    """Without augmentation, phase 2 on streamed images computes what it does on the cache."""
    embeddings, activations = _cache(folder, "views0")
    params = tiny_params()
    train_transfer(params, embeddings, tmp_path / "t.pt", tmp_path / "t.csv")
    cached = finetune(params, activations, tmp_path / "t.pt", tmp_path / "c.pt", tmp_path / "c.csv")
    streamed_params = tiny_params(data={"augment": []}, finetune={"input": "images"})
    streamed = finetune(
        streamed_params,
        activations,
        tmp_path / "t.pt",
        tmp_path / "s.pt",
        tmp_path / "s.csv",
        _split(folder),
    )
    assert len(cached.history) == len(streamed.history) == 3
    for c, s in zip(cached.history, streamed.history, strict=True):
        assert s.train_loss == pytest.approx(c.train_loss, abs=1e-4)
        assert s.val_loss == pytest.approx(c.val_loss, abs=1e-4)
    c_state = torch.load(tmp_path / "c.pt", weights_only=True)["state_dict"]
    s_state = torch.load(tmp_path / "s.pt", weights_only=True)["state_dict"]
    assert all(torch.allclose(c_state[k].float(), s_state[k].float(), atol=1e-4) for k in c_state)

    augmented = finetune(
        tiny_params(finetune={"input": "images"}),
        activations,
        tmp_path / "t.pt",
        tmp_path / "a.pt",
        tmp_path / "a.csv",
        _split(folder),
    )
    assert augmented.history[1].train_loss != pytest.approx(cached.history[1].train_loss, abs=1e-4)


def test_views_reach_both_phases(folder: Path, tmp_path: Path) -> None:
    plain_emb, plain_act = _cache(folder, "views0")
    view_emb, view_act = _cache(folder, "views2", features={"views": 2})
    params = tiny_params()
    histories = []
    for name, emb, act in (("plain", plain_emb, plain_act), ("views", view_emb, view_act)):
        first = train_transfer(params, emb, tmp_path / f"{name}.pt", tmp_path / f"{name}.csv")
        second = finetune(
            params, act, tmp_path / f"{name}.pt", tmp_path / "f.pt", tmp_path / "f.csv"
        )
        histories.append((first.history[0].train_loss, second.history[1].train_loss))
    (plain1, plain2), (views1, views2) = histories
    assert views1 != pytest.approx(plain1, abs=1e-6), "phase 1 trained on other inputs"
    assert views2 != pytest.approx(plain2, abs=1e-6), "phase 2 trained on other inputs"


def test_a_cache_made_for_streaming_has_no_training_activations(
    folder: Path, tmp_path: Path
) -> None:
    cached_embeddings, _ = _cache(folder, "views0")
    embeddings, activations = _cache(folder, "streaming", finetune={"input": "images"})
    assert not (activations / "train_activations.npy").exists()
    assert (activations / "val_activations.npy").exists()
    for name in ("train_embeddings.npy", "meta.json"):  # phase 1 need not rerun
        assert (embeddings / name).read_bytes() == (cached_embeddings / name).read_bytes()
    params = tiny_params()
    train_transfer(params, embeddings, tmp_path / "t.pt", tmp_path / "t.csv")
    with pytest.raises(cache.FeatureCacheError, match=r"finetune\.input is cached"):
        finetune(params, activations, tmp_path / "t.pt", tmp_path / "f.pt", tmp_path / "f.csv")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"features": {"views": 2}, "data": {"augment": []}}, r"features.views: 2 .* data.augment"),
        ({"data": {"augment": ["mixup"]}}, r"data.augment\[0\]: 'mixup' is not allowed"),
        (
            {"data": {"augment": ["rand_augment", "randaugment"]}},
            r"data.augment\[1\]: 'randaugment' is not allowed; expected one of .*rand_augment",
        ),
        ({"features": {"views": -1}}, r"features.views: -1"),
        ({"finetune": {"input": "disk"}}, r"finetune.input: 'disk' is not allowed"),
    ],
)
def test_augmentation_params_fail_in_one_line(raw: dict, message: str) -> None:
    with pytest.raises(ParamsError, match=message) as caught:
        parse_params(raw)
    assert "\n" not in str(caught.value)
