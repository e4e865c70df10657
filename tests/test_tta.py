"""Test-time augmentation: the mirrored cache, the averaged probabilities, predict --tta."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tests.helpers import make_imagefolder
from tests.test_phases import tiny_params
from twophase import cache, features, tta
from twophase.backbones import block_names, describe
from twophase.cache import FeatureCacheError
from twophase.checkpoint import load_checkpoint
from twophase.datasets import build_index
from twophase.evaluation import evaluate
from twophase.images import ImageDataset
from twophase.model import build_model, preprocessing
from twophase.network import FrozenTrunk, cached_input_model, resolve_cut
from twophase.params import Params
from twophase.phases import finetune, train_transfer
from twophase.predict import predict_images, read_checkpoint
from twophase.runtime import seed_everything
from twophase.split import split_index

CPU = torch.device("cpu")
FLIP = {"evaluate": {"tta": "flip"}}
TTA_PREDICTIONS = ("predictions_transfer_tta.csv", "predictions_finetune_tta.csv")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny imagefolder cached twice, without and with the mirrored cache, and both phases
    trained on the first (the plain arrays of the two caches are the same bytes)."""
    root = tmp_path_factory.mktemp("tta")
    make_imagefolder(root / "images", classes=("a", "b", "c"), train=8, test=4)
    split = split_index(build_index("imagefolder", root / "images"), 0.25, 42)
    split.to_csv(root / "split.csv", index=False)
    for name, params in (("none", tiny_params()), ("flip", tiny_params(**FLIP))):
        folder = root / name
        features.extract_features(
            params, split, folder / "embeddings", folder / "activations", tta_dir=folder / "tta"
        )
    params = tiny_params()
    train_transfer(params, root / "none/embeddings", root / "t.pt", root / "t.csv")
    finetune(params, root / "none/activations", root / "t.pt", root / "f.pt", root / "f.csv")
    return root


def _split(root: Path) -> pd.DataFrame:
    return pd.read_csv(root / "split.csv")


def _test_images(root: Path, params: Params, arch: str = "resnet18") -> torch.Tensor:
    """The test split's images as the features stage decodes them (eval transforms)."""
    rows = _split(root).query("subset == 'test'")
    prep = preprocessing(arch, params.model.weights)
    dataset = ImageDataset(rows["path"].tolist(), rows["label"].tolist(), 32, prep)
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


def test_views_and_average_are_the_mirror_and_the_mean() -> None:
    images = torch.arange(2 * 3 * 2 * 4, dtype=torch.float32).reshape(2, 3, 2, 4)
    plain, mirrored = tta.views(images, "flip")
    assert torch.equal(plain, images)
    assert torch.equal(mirrored, images[:, :, :, [3, 2, 1, 0]]), "left-right, rows kept"
    assert [torch.equal(v, images) for v in tta.views(images, "none")] == [True]
    with pytest.raises(ValueError, match="'crops'"):
        tta.views(images, "crops")
    first = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    second = torch.tensor([[0.1, 0.5, 0.4], [0.3, 0.3, 0.4]])
    by_hand = torch.tensor([[0.4, 0.35, 0.25], [0.2, 0.3, 0.5]])
    torch.testing.assert_close(tta.average([first, second]), by_hand)
    assert tta.average([first]) is first, "one view: its probabilities untouched"


def test_turning_tta_on_changes_no_byte_of_the_phases_inputs(root: Path) -> None:
    """The phases depend on data/embeddings and data/activations: they must hash the same."""
    for folder in ("embeddings", "activations"):
        plain = sorted(p.name for p in (root / "none" / folder).iterdir())
        assert plain == sorted(p.name for p in (root / "flip" / folder).iterdir())
        for name in plain:
            before = (root / "none" / folder / name).read_bytes()
            assert (root / "flip" / folder / name).read_bytes() == before, f"{folder}/{name}"
    assert [p.name for p in (root / "none/tta").iterdir()] == ["meta.json"]
    assert json.loads((root / "none/tta/meta.json").read_text()) == {"tta": "none"}
    assert sorted(p.name for p in (root / "flip/tta").iterdir()) == [
        "meta.json",
        "test_flip_activations.npy",
        "test_flip_embeddings.npy",
        "val_flip_activations.npy",
        "val_flip_embeddings.npy",
    ]
    meta = cache.load_meta(root / "flip/tta")
    assert meta == {"tta": "flip", "subsets": {"val": {"images": 6}, "test": {"images": 12}}}


def test_the_flipped_cache_is_the_trunk_on_the_mirrored_images(root: Path) -> None:
    params = tiny_params(**FLIP)
    seed_everything(params.seed)  # as the features stage does: weights none are drawn from it
    model = build_model("resnet18", "none", 32)
    family = describe(model, "resnet18")
    trunk = FrozenTrunk(model, family, resolve_cut("resnet18", block_names(model, family), ("1",)))
    images = _test_images(root, params)
    with torch.inference_mode():
        plain_acts, plain_embs = trunk.eval()(images)
        flip_acts, flip_embs = trunk(torch.flip(images, dims=[-1]))
    stored_embs = cache.load_flipped(root / "flip/tta", "test", "embeddings")
    stored_acts = cache.load_flipped(root / "flip/tta", "test", "activations")
    close = {"atol": 1e-4, "rtol": 1e-4}  # the stage ran channels-last, this NCHW
    torch.testing.assert_close(torch.from_numpy(np.array(stored_embs)), flip_embs, **close)
    torch.testing.assert_close(torch.from_numpy(np.array(stored_acts)), flip_acts, **close)
    plain, _ = cache.load_embeddings(root / "flip/embeddings", "test")
    torch.testing.assert_close(torch.from_numpy(np.array(plain)), plain_embs, **close)
    plain, _ = cache.load_activations(root / "flip/activations", "test")
    torch.testing.assert_close(torch.from_numpy(np.array(plain)), plain_acts, **close)
    assert not torch.allclose(flip_embs, plain_embs, atol=1e-3), "the mirror is another input"


def test_with_every_block_trained_the_flipped_activations_are_the_mirrored_images(
    tmp_path: Path, root: Path
) -> None:
    """finetune.unfreeze: all caches the images themselves (NHWC): exactly their mirror."""
    params = tiny_params(finetune={"unfreeze": ["all"]}, **FLIP)
    folder = tmp_path / "all"
    features.extract_features(
        params, _split(root), folder / "embeddings", folder / "activations", tta_dir=folder / "tta"
    )
    images = _test_images(root, params)
    stored = np.array(cache.load_flipped(folder / "tta", "test", "activations"))
    expected = images[:, :, :, torch.arange(31, -1, -1)].permute(0, 2, 3, 1)
    assert torch.equal(torch.from_numpy(stored), expected)
    plain, _ = cache.load_activations(folder / "activations", "test")
    assert torch.equal(torch.from_numpy(np.array(plain)), images.permute(0, 2, 3, 1))


def _evaluate(root: Path, params: Params, cached: str, name: str) -> dict:
    return evaluate(
        params,
        root / cached / "embeddings",
        root / cached / "activations",
        _split(root),
        {"transfer": root / "t.pt", "finetune": root / "f.pt"},
        root / name / "evaluate.json",
        root / name / "plots",
        root / cached / "tta",
    )


def test_evaluate_scores_the_hand_averaged_probabilities_and_keeps_the_plain_scores(
    root: Path,
) -> None:
    plain = _evaluate(root, tiny_params(), "none", "eval-none")
    summary = _evaluate(root, tiny_params(**FLIP), "flip", "eval-flip")
    assert list(summary) == [
        "test_images",
        "transfer",
        "finetune",
        "delta",
        "transfer_tta",
        "finetune_tta",
        "delta_tta",
        "most_confused",
    ]
    assert list(summary["most_confused"]) == [
        "transfer",
        "finetune",
        "transfer_tta",
        "finetune_tta",
    ]
    assert list(plain) == ["test_images", "transfer", "finetune", "delta", "most_confused"]
    for key in ("test_images", "transfer", "finetune", "delta"):
        assert summary[key] == plain[key], key
    for phase, pairs in plain["most_confused"].items():
        assert summary["most_confused"][phase] == pairs, phase
    for name in ("predictions_transfer.csv", "predictions_finetune.csv", "per_class.csv"):
        before = (root / "eval-none/plots" / name).read_bytes()
        assert (root / "eval-flip/plots" / name).read_bytes() == before, "the plain predictions"
    written = sorted(p.name for p in (root / "eval-flip/plots").iterdir())
    assert written == sorted(
        [*(p.name for p in (root / "eval-none/plots").iterdir()), *TTA_PREDICTIONS]
    )
    _, labels = cache.load_embeddings(root / "flip/embeddings", "test")
    for phase, kind in (("transfer", "embeddings"), ("finetune", "activations")):
        network, checkpoint = load_checkpoint(root / f"{phase[0]}.pt")
        model = cached_input_model(network, checkpoint).eval()
        plain_inputs, mirrored = (
            torch.from_numpy(np.load(path))
            for path in (
                root / "flip" / kind / f"test_{kind}.npy",
                root / "flip/tta" / f"test_flip_{kind}.npy",
            )
        )
        if kind == "activations":  # stored (N, H, W, C): the network takes (N, C, H, W)
            plain_inputs, mirrored = (x.permute(0, 3, 1, 2) for x in (plain_inputs, mirrored))
        with torch.inference_mode():
            p = torch.softmax(model(plain_inputs), dim=1)
            q = torch.softmax(model(mirrored), dim=1)
        hand = ((p + q) / 2).argmax(dim=1).numpy()
        table = pd.read_csv(root / f"eval-flip/plots/predictions_{phase}_tta.csv")
        names = checkpoint["class_names"]
        assert table["predicted"].tolist() == [names[i] for i in hand], phase
        np.testing.assert_allclose(table["probability"], ((p + q) / 2).max(dim=1).values, atol=2e-6)
        accuracy = round(float(np.mean(hand == labels)), 6)
        assert summary[f"{phase}_tta"]["accuracy"] == pytest.approx(accuracy, abs=1e-6), phase
        plain_accuracy = round(float(np.mean(p.argmax(dim=1).numpy() == labels)), 6)
        assert summary[phase]["accuracy"] == pytest.approx(plain_accuracy, abs=1e-6), phase
    assert summary["delta_tta"]["accuracy"] == pytest.approx(
        summary["finetune_tta"]["accuracy"] - summary["transfer_tta"]["accuracy"], abs=1e-6
    )


def test_evaluate_refuses_a_cache_without_the_mirrored_images(root: Path) -> None:
    with pytest.raises(FeatureCacheError, match=r"evaluate.tta: 'flip' .* holds 'none'"):
        _evaluate(root, tiny_params(**FLIP), "none", "eval-stale")


def test_features_refuse_flip_without_a_folder_for_it(root: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs a folder"):
        features.extract_features(
            tiny_params(**FLIP), _split(root), tmp_path / "embeddings", tmp_path / "activations"
        )


def test_predict_tta_flip_averages_the_image_and_its_mirror(root: Path) -> None:
    model, checkpoint = read_checkpoint(root / "f.pt")
    paths = _split(root).query("subset == 'test'")["path"].tolist()
    names = checkpoint["class_names"]
    flipped = predict_images(model, checkpoint, paths, top_k=3, device="cpu", tta="flip")
    plain = predict_images(model, checkpoint, paths, top_k=3, device="cpu")
    images = _test_images(root, tiny_params())
    with torch.inference_mode():
        p = torch.softmax(model(images), dim=1)
        q = torch.softmax(model(torch.flip(images, dims=[-1])), dim=1)
    for table, probs in ((plain, p), (flipped, (p + q) / 2)):
        assert table["predicted"].tolist() == [names[i] for i in probs.argmax(dim=1).tolist()]
        for rank in (1, 2, 3):
            column = table[f"top{rank}"].map(names.index).to_numpy().copy()
            expected = probs[torch.arange(len(paths)), torch.from_numpy(column)].numpy()
            np.testing.assert_allclose(table[f"top{rank}_probability"], expected, atol=2e-6)
    assert not np.allclose(plain["top1_probability"], flipped["top1_probability"], atol=1e-4)


def test_cli_predict_tta_flip_writes_the_averaged_probabilities(root: Path, tmp_path: Path) -> None:
    from twophase.cli import TTA_MODES, main
    from twophase.params import TTA_MODES as PARAMS_TTA_MODES

    assert TTA_MODES == PARAMS_TTA_MODES
    model, checkpoint = read_checkpoint(root / "f.pt")
    folder = str(root / "images/test")
    out = tmp_path / "flip.csv"
    assert main(["predict", str(root / "f.pt"), folder, "--tta", "flip", "--out", str(out)]) == 0
    written = pd.read_csv(out)
    expected = predict_images(model, checkpoint, written["path"].tolist(), tta="flip")
    np.testing.assert_allclose(written["probability"], expected["probability"], atol=1e-6)
    assert written["predicted"].tolist() == expected["predicted"].tolist()
    with pytest.raises(SystemExit):
        main(["predict", str(root / "f.pt"), folder, "--tta", "crops"])
