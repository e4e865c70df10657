"""Every supported torchvision family through one table: names, blocks, the cut, one-line errors."""

from __future__ import annotations

import pytest
import torch
import torchvision

from twophase.backbones import FAMILIES, block_names, describe, supported_archs
from twophase.model import build_model, check_arch
from twophase.network import FrozenTrunk, resolve_cut
from twophase.params import ParamsError, parse_params

CPU = torch.device("cpu")


def test_every_torchvision_name_of_the_families_is_supported() -> None:
    names = torchvision.models.list_models(module=torchvision.models)
    family_prefixes = ("resnet", "resnext", "wide_resnet", "regnet_", "convnext_")
    family_prefixes += ("efficientnet_", "mobilenet_v3_", "vit_", "swin_")
    expected = {n for n in names if n.startswith(family_prefixes)}
    assert set(supported_archs()) == expected
    assert len(expected) >= 50
    assert {"vgg16", "densenet121", "mobilenet_v2", "maxvit_t"}.isdisjoint(supported_archs())
    assert {family.name for family in FAMILIES} >= {"ViT", "ConvNeXt"}


def test_an_unsupported_arch_names_the_closest_ones_in_one_short_line() -> None:
    with pytest.raises(
        ParamsError,
        match=r"^model.arch: 'vgg16' is not supported \(docs/backbones.md lists the 53 torch",
    ):
        check_arch("vgg16")
    with pytest.raises(ParamsError) as caught:
        check_arch("resnet19")
    message = str(caught.value)
    assert "did you mean resnet18, " in message and "\n" not in message and len(message) < 250


@pytest.mark.parametrize(
    ("arch", "unfreeze", "cut"),
    [
        ("resnet18", ["layer4"], "layer4"),
        ("resnet18", ["layer3", "layer4"], "layer3"),
        ("resnet18", ["1"], "layer4"),
        ("resnet18", ["all"], None),
        ("convnext_tiny", ["features.6"], "features.6"),  # with features.7 (tests/test_blocks)
        ("convnext_tiny", ["3"], "features.2"),
        ("efficientnet_b0", ["features.4", "features.6"], "features.4"),
        ("vit_b_16", ["encoder.layers.encoder_layer_11"], "encoder.layers.encoder_layer_11"),
        ("swin_t", ["2"], "features.4"),
    ],
)
def test_unfreeze_names_blocks_in_the_models_own_terms(
    arch: str, unfreeze: list[str], cut: str | None
) -> None:
    unfreeze = list(parse_params({"finetune": {"unfreeze": unfreeze}}).finetune.unfreeze)
    model = build_model(arch, "none", 32)
    assert resolve_cut(arch, block_names(model, describe(model, arch)), unfreeze) == cut


@pytest.mark.parametrize("unfreeze", [["layer2"], ["layer4", "fc"], ["5"], ["features.7"]])
def test_an_invalid_unfreeze_lists_the_valid_choices_for_the_arch(unfreeze: list[str]) -> None:
    blocks = ["layer1", "layer2", "layer3", "layer4"]
    with pytest.raises(ParamsError) as caught:
        resolve_cut("resnet18", blocks, unfreeze)
    message = str(caught.value)
    assert message.startswith(f"finetune.unfreeze: {unfreeze!r} is not allowed for resnet18")
    assert "[layer4] or [layer3, layer4]" in message and "1..4" in message


def test_an_image_size_that_misfits_the_patch_grid_is_one_line() -> None:
    from twophase.cache import output_shapes

    with pytest.raises(ParamsError, match=r"^data.image_size: 30 does not fit vit_b_16 \(Input"):
        build_model("vit_b_16", "none", 30)
    # a ViT built for 32 px (as pretrained weights fix their own size) fed another size
    vit = build_model("vit_b_16", "none", 32)
    trunk = FrozenTrunk(vit, describe(vit, "vit_b_16"), None)
    with pytest.raises(ParamsError, match=r"^data.image_size: 48 does not fit the model \(Wrong"):
        output_shapes(trunk, 48, CPU)


def test_timm_blocks_come_from_feature_info_and_the_tail_is_checked() -> None:
    from twophase.backbones import ArchError
    from twophase.network import check_tail

    model = build_model("timm/efficientnet_b0", "none", 32)
    family = describe(model, "timm/efficientnet_b0")
    # feature_info ends stages at blocks.0, .1, .2, .4, .6: the stages start after the last one
    assert block_names(model, family) == [f"blocks.{i}" for i in (0, 1, 2, 3, 5)]
    assert family.classifier == "classifier"
    # from blocks.5 on, its stage's blocks.6 runs too, then the final conv
    steps = family.tail_steps(model, "blocks.5")
    assert steps == ["blocks.5", "blocks.6", "conv_head", "bn2", "forward_head"]
    hrnet = build_model("timm/hrnet_w18_small", "none", 64)
    with pytest.raises(ArchError, match="is not supported: its forward after"):
        check_tail(hrnet, describe(hrnet, "timm/hrnet_w18_small"), "stage4", 64, "hrnet")


def test_unknown_timm_name_is_one_line() -> None:
    with pytest.raises(ParamsError, match=r"^model.arch: 'timm/resnet19' is not a timm model name"):
        check_arch("timm/resnet19")
