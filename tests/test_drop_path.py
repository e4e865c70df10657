"""model.drop_path: stochastic depth of phase 2's unfrozen blocks, set where the network is built.

The frozen trunk runs in eval mode, where stochastic depth does nothing, so neither the feature
cache nor phase 1 depends on it; phase 2 builds phase 1's network with it, and its checkpoint
records it. Rates rise linearly with depth to model.drop_path at the last block, as torchvision's
ConvNeXt builder lays out its `stochastic_depth_prob`.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from tests.helpers import PROJECT, make_imagefolder
from tests.test_phases import tiny_params
from twophase import features
from twophase.checkpoint import load_checkpoint
from twophase.datasets import build_index
from twophase.evaluation import evaluate
from twophase.model import check_drop_path, create_model
from twophase.params import Params, ParamsError, parse_params
from twophase.phases import finetune, train_transfer
from twophase.predict import predict_images, read_checkpoint
from twophase.split import split_index

ARCH = "convnext_tiny"  # 3 + 3 + 9 + 3 blocks; unfreeze: 1 trains features.6 and .7 (the last 3)


def rates(model: torch.nn.Module) -> dict[str, float]:
    return {n: m.p for n, m in model.named_modules() if type(m).__name__ == "StochasticDepth"}


def _params(drop_path: float) -> Params:
    return tiny_params(
        model={"arch": ARCH, "drop_path": drop_path},
        train_transfer={"epochs": 1},
        finetune={"epochs": 1},
    )


@pytest.fixture(scope="module")
def phase1(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    """ConvNeXt's feature cache and phase 1, made with drop_path 0: neither depends on it."""
    root = tmp_path_factory.mktemp("drop_path")
    make_imagefolder(root / "images", classes=("a", "b", "c"), train=6, test=2)
    split = split_index(build_index("imagefolder", root / "images"), 0.25, 42)
    params = _params(0.0)
    features.extract_features(params, split, root / "embeddings", root / "activations")
    train_transfer(params, root / "embeddings", root / "transfer.pt", root / "t.csv")
    return root, split


def _finetune(root: Path, drop_path: float, out: Path) -> list[float]:
    result = finetune(
        _params(drop_path), root / "activations", root / "transfer.pt", out, Path(f"{out}.csv")
    )
    return [row.train_loss for row in result.history]


def test_phase_two_trains_with_drop_path_and_its_checkpoint_rebuilds_it(
    phase1: tuple[Path, pd.DataFrame], tmp_path: Path
) -> None:
    root, split = phase1
    without = _finetune(root, 0.0, tmp_path / "off.pt")
    with_drop = _finetune(root, 0.3, tmp_path / "on.pt")
    assert without[0] == with_drop[0], "epoch 0 scores the starting weights: no training yet"
    assert without[1] != pytest.approx(with_drop[1], abs=1e-6), "drop path acted in training"

    network, checkpoint = load_checkpoint(tmp_path / "on.pt")
    assert checkpoint["drop_path"] == 0.3
    got = rates(network)
    assert len(got) == 18
    # block i of 18 (0-based) drops with probability 0.3 * i / 17: the unfrozen last three
    last = [got[f"features.7.{i}.stochastic_depth"] for i in range(3)]
    assert last == pytest.approx([0.3 * 15 / 17, 0.3 * 16 / 17, 0.3], abs=1e-12)
    reference = torchvision_model(stochastic_depth_prob=0.3)
    assert list(got.values()) == pytest.approx(list(rates(reference).values()), abs=1e-12)
    off, _ = load_checkpoint(tmp_path / "off.pt")
    assert set(rates(off).values()) == {0.0}, "0 turns off what torchvision's builder has on"
    assert "drop_path" not in torch.load(root / "transfer.pt", weights_only=True)

    # inference loads either checkpoint: evaluate, and predict on raw images
    summary = evaluate(
        _params(0.3),
        root / "embeddings",
        root / "activations",
        split,
        {"transfer": root / "transfer.pt", "finetune": tmp_path / "on.pt"},
        tmp_path / "evaluate.json",
        tmp_path / "plots",
    )
    assert summary["test_images"] == 6
    model, loaded = read_checkpoint(tmp_path / "on.pt")
    evaluated = pd.read_csv(tmp_path / "plots" / "predictions_finetune.csv")
    predicted = predict_images(model, loaded, list(evaluated["path"]), batch_size=4)
    assert list(predicted["predicted"]) == list(evaluated["predicted"].astype(str))


def torchvision_model(**kwargs: float) -> torch.nn.Module:
    import torchvision

    return torchvision.models.get_model(ARCH, **kwargs)


def test_eval_outputs_do_not_depend_on_drop_path_and_training_outputs_do() -> None:
    off, on = create_model(ARCH, {}, 0.0), create_model(ARCH, {}, 0.5)
    on.load_state_dict(off.state_dict())
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(off.eval()(images), on.eval()(images))
        torch.manual_seed(1)
        off_train = off.train()(images)
        assert torch.equal(off.train()(images), off_train), "no drop path: no randomness"
        torch.manual_seed(1)
        on_train = on.train()(images)
    assert not torch.allclose(on_train, off_train)


def test_zero_leaves_every_other_model_as_its_library_builds_it() -> None:
    """The default (0) must not change a ResNet, nor give a timm model DropPath modules."""
    assert str(create_model("resnet18", {}, 0.0)) == str(create_model("resnet18", {}))
    timm_model = create_model("timm/convnext_atto", {}, 0.0)
    assert str(timm_model) == str(create_model("timm/convnext_atto", {}))
    assert not any(type(m).__name__ == "DropPath" for m in timm_model.modules())
    timm_drop = [
        m.drop_prob
        for m in create_model("timm/convnext_atto", {}, 0.2).modules()
        if type(m).__name__ == "DropPath"
    ]
    assert timm_drop and max(timm_drop) == pytest.approx(0.2)


def test_swin_gets_the_rates_its_builder_fixes_for_the_same_value() -> None:
    """swin_t's builder fixes stochastic_depth_prob at 0.2; set to 0.2, the rates are its own."""
    import torchvision

    built = rates(torchvision.models.get_model("swin_t"))
    assert list(rates(create_model("swin_t", {}, 0.2)).values()) == pytest.approx(
        list(built.values()), abs=1e-12
    )


@pytest.mark.parametrize(
    ("arch", "why"),
    [
        ("resnet18", r"torchvision's ResNet, ResNeXt, Wide ResNet family has no stochastic depth"),
        ("vit_b_16", r"torchvision's ViT family has no stochastic depth"),
        ("timm/vgg11", r"timm's builder takes no drop_path_rate"),
    ],
)
def test_drop_path_for_an_arch_without_it_is_a_params_error(arch: str, why: str) -> None:
    with pytest.raises(
        ParamsError, match=rf"^model.drop_path: 0.1 is not allowed for {arch} \({why}"
    ):
        check_drop_path(arch, 0.1)
    check_drop_path(arch, 0.0)
    check_drop_path("convnext_tiny", 0.1)
    check_drop_path("timm/convnext_atto", 0.1)


@pytest.mark.parametrize("value", [-0.1, 1.0, "high"])
def test_drop_path_outside_zero_to_one_is_a_params_error(value: object) -> None:
    with pytest.raises(ParamsError, match=r"^model.drop_path: ") as caught:
        parse_params({"model": {"drop_path": value}})
    assert "\n" not in str(caught.value)


def test_the_validate_stage_refuses_drop_path_for_a_resnet(tmp_path: Path) -> None:
    (tmp_path / "data" / "raw").mkdir(parents=True)
    (tmp_path / "params.yaml").write_text(
        yaml.safe_dump({"model": {"arch": "resnet18", "drop_path": 0.1}})
    )
    run = subprocess.run(
        [sys.executable, str(PROJECT / "stages" / "validate.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode != 0
    assert "model.drop_path: 0.1 is not allowed for resnet18" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert not (tmp_path / "data" / "params.checked").exists()


def test_drop_path_reruns_phase_two_not_the_cache_nor_phase_one() -> None:
    stages = yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"]

    def depends(stage: str, key: str) -> bool:
        entries = [e if isinstance(e, str) else next(iter(e)) for e in stages[stage]["params"]]
        return any(key == entry or key.startswith(f"{entry}.") for entry in entries)

    assert depends("finetune", "model.drop_path")
    assert not depends("features", "model.drop_path")
    assert not depends("train_transfer", "model.drop_path")
    for key in ("model.arch", "model.weights", "model.dense_units", "model.dropout"):
        assert depends("train_transfer", key), key


def test_the_default_keeps_the_builders_own_stochastic_depth() -> None:
    """model.drop_path: null (the default) trains phase 2 as the model library builds it, as
    before the param existed; the checkpoint records no rate."""
    import torchvision

    assert Params().model.drop_path is None
    assert parse_params({"model": {"drop_path": None}}).model.drop_path is None
    built = create_model("efficientnet_b0", {}, Params().model.drop_path)
    reference = rates(torchvision.models.efficientnet_b0())
    assert rates(built) == reference and max(reference.values()) > 0
