"""The stage functions on a tiny imagefolder: features once, two phases, evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from tests.helpers import make_imagefolder
from twophase import cache, features
from twophase.batches import array_batches
from twophase.checkpoint import load_checkpoint
from twophase.datasets import build_index
from twophase.evaluation import evaluate
from twophase.network import cached_input_model
from twophase.params import Params, parse_params
from twophase.phases import finetune, train_transfer
from twophase.report import PHASE_STAGES as PHASES
from twophase.report import build_report
from twophase.split import split_index
from twophase.train import run_epoch

CPU = torch.device("cpu")


def tiny_params(**overrides: dict) -> Params:
    raw = {
        "device": "cpu",
        "data": {"dataset": "imagefolder", "image_size": 32, "val_ratio": 0.25},
        "model": {"weights": "none", "dense_units": [16]},
        "features": {"batch_size": 8, "num_workers": 0, "dtype": "float32"},
        "train_transfer": {"lr": 0.01, "epochs": 6, "batch_size": 8},
        "finetune": {"lr": 0.001, "epochs": 2, "batch_size": 8},
    }
    for section, values in overrides.items():
        raw[section] = {**raw.get(section, {}), **values}
    return parse_params(raw)


def cached_imagefolder(root: Path, test: int = 3) -> tuple[Params, pd.DataFrame]:
    """A tiny 3-class imagefolder under root/images, split and cached as the stages do."""
    make_imagefolder(root / "images", classes=("a", "b", "c"), train=8, test=test)
    params = tiny_params()
    split = split_index(build_index("imagefolder", root / "images"), 0.25, params.seed)
    split.to_csv(root / "split.csv", index=False)
    features.extract_features(params, split, root / "embeddings", root / "activations")
    return params, split


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("phases")
    cached_imagefolder(root)
    return root


def test_feature_cache_holds_every_subset_memory_mapped(workdir: Path) -> None:
    meta = cache.load_meta(workdir / "activations")
    assert meta["cut"] == "layer4" and meta["class_names"] == ["a", "b", "c"]
    assert "cut" not in cache.load_meta(workdir / "embeddings")
    embeddings, _ = cache.load_embeddings(workdir / "embeddings", "train")
    activations, _ = cache.load_activations(workdir / "activations", "train")
    assert isinstance(activations, np.memmap)
    assert embeddings.shape == (18, 512)
    assert activations.shape == (18, 2, 2, 256)  # layer3's output at 32 px, NHWC
    _, test_labels = cache.load_embeddings(workdir / "embeddings", "test")
    assert test_labels.tolist() == [0] * 3 + [1] * 3 + [2] * 3


def test_checkpoint_holds_the_best_epoch_and_runs_are_identical(workdir: Path) -> None:
    params = tiny_params()
    runs = []
    for attempt in range(2):
        ckpt = workdir / f"transfer{attempt}.pt"
        result = train_transfer(params, workdir / "embeddings", ckpt, workdir / f"h{attempt}.csv")
        runs.append((result, ckpt))
    (first, ckpt), (second, ckpt2) = runs
    assert {k: v for k, v in first.summary().items() if k != "wall_seconds"} == {
        k: v for k, v in second.summary().items() if k != "wall_seconds"
    }
    assert (workdir / "h0.csv").read_bytes() == (workdir / "h1.csv").read_bytes()
    network, meta = load_checkpoint(ckpt)
    other, _ = load_checkpoint(ckpt2)
    for key, value in network.state_dict().items():
        assert torch.equal(value, other.state_dict()[key]), key
    val = cache.load_embeddings(workdir / "embeddings", "val")
    loss, _ = run_epoch(cached_input_model(network, meta), array_batches(*val, 8), CPU)
    assert loss == pytest.approx(first.best_val_loss, abs=1e-5)
    assert meta["best_epoch"] == first.best_epoch


def test_finetune_continues_from_phase_one_and_evaluate_scores_both(workdir: Path) -> None:
    params = tiny_params()
    embeddings, activations = workdir / "embeddings", workdir / "activations"
    first = train_transfer(params, embeddings, workdir / "t.pt", workdir / "t.csv")
    second = finetune(params, activations, workdir / "t.pt", workdir / "f.pt", workdir / "f.csv")
    assert second.start_epoch == first.history[-1].epoch, "phase 2 validates its start first"
    assert second.history[0].epoch == first.history[-1].epoch
    assert second.history[0].val_loss == pytest.approx(first.best_val_loss, abs=1e-5)
    assert second.history[1].epoch == first.history[-1].epoch + 1
    network, meta = load_checkpoint(workdir / "f.pt")
    assert meta["cut"] == "layer4" and meta["reads"] == "activations"
    phase1, _ = load_checkpoint(workdir / "t.pt")
    for name in ("conv1", "layer1", "layer3"):
        block_a = network.get_submodule(name).state_dict()
        block_b = phase1.get_submodule(name).state_dict()
        assert all(torch.equal(block_a[k], block_b[k]) for k in block_a), name
    summary = evaluate(
        params,
        embeddings,
        activations,
        pd.read_csv(workdir / "split.csv"),
        {"transfer": workdir / "t.pt", "finetune": workdir / "f.pt"},
        workdir / "metrics" / "evaluate.json",
        workdir / "plots",
    )
    assert summary["test_images"] == 9
    assert summary["delta"]["accuracy"] == pytest.approx(
        summary["finetune"]["accuracy"] - summary["transfer"]["accuracy"], abs=1e-6
    )
    assert sorted(path.name for path in (workdir / "plots").iterdir()) == [
        "per_class.csv",
        "predictions_finetune.csv",
        "predictions_transfer.csv",
        "trained_blocks.json",
    ]
    assert json.loads((workdir / "plots" / "trained_blocks.json").read_text()) == {
        "transfer": [],
        "finetune": ["layer4"],
    }
    report_draws_what_evaluate_wrote(params, workdir)


def report_draws_what_evaluate_wrote(params: Params, workdir: Path) -> None:
    (workdir / "metrics").mkdir(exist_ok=True)
    for phase, stage in (("t", "train_transfer"), ("f", "finetune")):
        (workdir / "plots" / stage).mkdir()
        (workdir / f"{phase}.csv").rename(workdir / "plots" / stage / "history.csv")
        (workdir / "metrics" / f"{stage}.json").write_text('{"best_epoch": 1}')
    text = build_report(
        params,
        metrics_dir=workdir / "metrics",
        plots_dir=workdir / "plots",
        evaluate_dir=workdir / "plots",
        report_path=workdir / "report.md",
        figures_dir=workdir / "figures",
    )
    assert "phase 2 trains `layer4` and the head (finetune.unfreeze: 1)" in text
    figures = sorted(path.name for path in (workdir / "figures").iterdir())
    assert figures == sorted(
        ["loss.png", "accuracy.png"]
        + [f"{kind}_{phase}.png" for kind in ("confusion", "grid") for phase in PHASES]
    )
    for name in figures:
        with Image.open(workdir / "figures" / name) as image:
            assert image.width > 300 and image.height > 200, name
        assert f"](figures/{name})" in text, name


def test_a_skipped_phase_two_says_so_in_the_log_the_metrics_and_the_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """finetune.epochs: 0 left in params.yaml would otherwise silently report a delta of 0."""
    import json
    import shutil

    from twophase.phases import finetune_summary

    params, split = cached_imagefolder(tmp_path)
    params = tiny_params(finetune={"epochs": 0})
    train_transfer(params, tmp_path / "embeddings", tmp_path / "t.pt", tmp_path / "t.csv")
    result = finetune(
        params, tmp_path / "activations", tmp_path / "t.pt", tmp_path / "f.pt", tmp_path / "f.csv"
    )
    assert "phase 2 is SKIPPED" in capsys.readouterr().out
    summary = finetune_summary(result)
    assert summary["skipped"] is True and summary["kept_phase1_weights"] is True
    evaluate(
        params,
        tmp_path / "embeddings",
        tmp_path / "activations",
        split,
        {"transfer": tmp_path / "t.pt", "finetune": tmp_path / "f.pt"},
        tmp_path / "metrics" / "evaluate.json",
        tmp_path / "plots",
    )
    for phase, stage in (("t", "train_transfer"), ("f", "finetune")):
        (tmp_path / "plots" / stage).mkdir()
        shutil.copy(tmp_path / f"{phase}.csv", tmp_path / "plots" / stage / "history.csv")
    (tmp_path / "metrics" / "train_transfer.json").write_text('{"best_epoch": 1}')
    (tmp_path / "metrics" / "finetune.json").write_text(json.dumps(summary))
    text = build_report(
        params,
        metrics_dir=tmp_path / "metrics",
        plots_dir=tmp_path / "plots",
        evaluate_dir=tmp_path / "plots",
        report_path=tmp_path / "report.md",
        figures_dir=tmp_path / "figures",
    )
    assert "**Phase 2 was skipped** (`finetune.epochs: 0`)" in text


def test_a_last_batch_of_one_with_batchnorm_in_train_mode_is_a_params_error(
    workdir: Path,
) -> None:
    from twophase.params import ParamsError

    train_transfer(tiny_params(), workdir / "embeddings", workdir / "t1.pt", workdir / "t1.csv")
    params = tiny_params(finetune={"batchnorm": "train", "batch_size": 17})  # 18 training rows
    with pytest.raises(ParamsError, match=r"^finetune\.batch_size: 17 leaves a last batch of 1"):
        finetune(
            params,
            workdir / "activations",
            workdir / "t1.pt",
            workdir / "f1.pt",
            workdir / "f1.csv",
        )


def _recording(function, calls: list[dict]):  # type: ignore[no-untyped-def]
    """`function`, recording the keyword arguments of each call in `calls`."""

    def recorded(*args: object, **kwargs: object) -> object:
        calls.append(kwargs)
        return function(*args, **kwargs)

    return recorded


def test_each_phase_weighs_the_classes_of_its_training_split_and_mixes_as_its_params_say(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Class weights from the whole training split (class a cut to 2 of 14 images) reach the
    loss of both phases, on cached activations and on streamed images, and of the linear probe;
    mixing follows each phase's alphas (CutMix on streamed images)."""
    from sklearn.utils.class_weight import compute_class_weight

    from twophase import phases
    from twophase.mixing import Mixing

    make_imagefolder(tmp_path / "images", classes=("a", "b", "c"), train=8, test=3)
    split = split_index(build_index("imagefolder", tmp_path / "images"), 0.25, 42)
    cut = split.index[(split["subset"] == "train") & (split["label"] == 0)][:4]
    split = split.drop(cut).reset_index(drop=True)
    train_labels = split.loc[split["subset"] == "train", "label"].to_numpy()
    expected = compute_class_weight("balanced", classes=np.arange(3), y=train_labels)
    assert expected.max() > 2 * expected.min()
    calls: list[dict] = []
    monkeypatch.setattr(phases, "fit", _recording(phases.fit, calls))
    monkeypatch.setattr(phases, "fit_linear_probe", _recording(phases.fit_linear_probe, calls))
    for streamed in (False, True):
        out = tmp_path / ("streamed" if streamed else "cached")
        params = tiny_params(
            train_transfer={"class_weights": "balanced", "mixup": 0.4},
            finetune={
                "class_weights": "balanced",
                "mixup": 0.2,
                **({"input": "images", "cutmix": 1.0} if streamed else {}),
            },
        )
        features.extract_features(params, split, out / "embeddings", out / "activations")
        first = train_transfer(params, out / "embeddings", out / "t.pt", out / "t.csv")
        second = finetune(
            params, out / "activations", out / "t.pt", out / "f.pt", out / "f.csv", split
        )
        for result in (first, second):
            assert all(np.isfinite([row.train_loss, row.val_loss]).all() for row in result.history)
    assert [call["mixing"] for call in calls] == [
        Mixing(0.4),
        Mixing(0.2),
        Mixing(0.4),
        Mixing(0.2, 1.0),
    ]
    probe = tiny_params(
        model={"dense_units": []}, train_transfer={"solver": "lbfgs", "class_weights": "balanced"}
    )
    train_transfer(probe, tmp_path / "cached" / "embeddings", tmp_path / "p.pt", tmp_path / "p.csv")
    assert len(calls) == 5
    for call in calls:
        assert call["class_weights"].tolist() == pytest.approx(expected.tolist(), rel=1e-6)
