"""Issue F: every supported torchvision family through one table, and checkpoints that load
into plain torchvision."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from tests.helpers import PROJECT
from tests.test_train import tiny_network
from twophase import features
from twophase.backbones import FAMILIES, Tail, block_names, describe, supported_archs
from twophase.batches import array_batches
from twophase.checkpoint import cached_input_model, load_checkpoint, save_checkpoint
from twophase.features import FrozenTrunk, extract
from twophase.model import Preprocessing, build_model, check_arch, model_kwargs, resolve_cut
from twophase.params import ParamsError, parse_params
from twophase.train import FitResult, predict

CPU = torch.device("cpu")
# one model of each family, at a size that fits its patch grid / downsampling
ONE_PER_FAMILY = {
    "resnet18": 32,
    "regnet_y_400mf": 32,
    "convnext_tiny": 32,
    "efficientnet_b0": 32,
    "mobilenet_v3_small": 32,
    "vit_b_16": 32,
    "swin_t": 32,
}
TIMM = {  # the optional extra; installed with the dev dependencies
    "timm/resnet18": 32,
    "timm/convnext_atto": 32,
    "timm/efficientnet_b0": 32,
    "timm/vit_tiny_patch16_224": 224,
    "timm/swin_tiny_patch4_window7_224": 224,
}


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
    with pytest.raises(ParamsError, match=r"^model.arch: 'vgg16' is not supported \(53 torch"):
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
    from twophase.features import output_shapes

    with pytest.raises(ParamsError, match=r"^data.image_size: 30 does not fit vit_b_16 \(Input"):
        build_model("vit_b_16", "none", 30)
    # a ViT built for 32 px (as pretrained weights fix their own size) fed another size
    vit = build_model("vit_b_16", "none", 32)
    trunk = FrozenTrunk(vit, describe(vit, "vit_b_16"), None)
    with pytest.raises(ParamsError, match=r"^data.image_size: 48 does not fit the model \(Wrong"):
        output_shapes(trunk, 48, CPU)


def readme_loader() -> str:
    """The docs' snippet that loads a checkpoint with torchvision alone."""
    readme = (PROJECT / "docs" / "use-the-model.md").read_text()
    section = readme[readme.index("## Load a checkpoint without twophase") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)  # type: ignore[union-attr]


@pytest.mark.parametrize(("arch", "size"), [*ONE_PER_FAMILY.items(), *TIMM.items()])
def test_cached_path_equals_streamed_and_checkpoint_loads_into_plain_torchvision(
    arch: str, size: int, tmp_path: Path
) -> None:
    tail = tiny_network(arch=arch, first=None, dropout=0.0)
    model, family = tail.model, tail.family
    cut = block_names(model, family)[-1]
    images = torch.randn(5, 3, size, size)
    paths, labels = _saved(images, tmp_path)
    extract(
        FrozenTrunk(copy.deepcopy(model), family, cut),
        {"test": (paths, labels)},
        tmp_path / "embeddings",
        tmp_path / "activations",
        image_size=size,
        prep=Preprocessing(),
        batch_size=2,
        num_workers=0,
        device=CPU,
        meta={"arch": arch},
        dtype="float32",
    )
    activations, _ = features.load_activations(tmp_path / "activations", "test")
    nhwc = features.load_meta(tmp_path / "activations")["layout"] == "nchw"
    cached_probs, _ = predict(
        Tail(model, family, cut), array_batches(activations, np.array(labels), 2, nhwc=nhwc), CPU
    )
    streamed = _streamed_probs(model, paths, size)
    assert torch.allclose(cached_probs, streamed, atol=1e-4)

    meta = {
        "arch": arch,
        "classifier": family.classifier,
        "model_kwargs": model_kwargs(arch, "none", size),
        "embedding_dim": model.get_submodule(family.classifier)[0].in_features,
        "class_names": ["a", "b", "c"],
        "image_size": size,
        "preprocessing": {},
    }
    params = parse_params({"model": {"arch": arch, "dense_units": [16], "dropout": 0.0}})
    save_checkpoint(
        model.state_dict(),
        tmp_path / "finetune.pt",
        phase="finetune",
        params=params,
        features_meta=meta,
        reads="activations",
        cut=cut,
        result=FitResult(),
        last_epoch=0,
    )
    namespace: dict = {}
    exec(readme_loader().replace("models/finetune.pt", str(tmp_path / "finetune.pt")), namespace)
    plain = namespace["model"].eval()  # loaded with strict=True, without twophase
    library = "timm." if arch.startswith("timm/") else "torchvision."
    assert type(plain).__module__.startswith(library), type(plain)
    reloaded, checkpoint = load_checkpoint(tmp_path / "finetune.pt")
    evaluated, _ = predict(
        cached_input_model(reloaded, checkpoint),
        array_batches(activations, np.array(labels), 2, nhwc=nhwc),
        CPU,
    )
    assert torch.allclose(_streamed_probs(plain, paths, size), evaluated, atol=1e-4)


def _saved(images: torch.Tensor, folder: Path) -> tuple[list[str], list[int]]:
    """Images as PNG files (what the cache reads), lossless."""
    from PIL import Image

    paths = []
    for i, image in enumerate(images):
        pixels = (image.clamp(-2, 2) * 60 + 128).round().clamp(0, 255).byte()
        path = folder / "images" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(path)
        paths.append(str(path))
    return paths, [i % 3 for i in range(len(paths))]


def _streamed_probs(model: torch.nn.Module, paths: list[str], size: int) -> torch.Tensor:
    from twophase.batches import BatchOrder
    from twophase.images import ImageDataset, image_batches

    data = ImageDataset(paths, [0] * len(paths), size, Preprocessing())
    probs, _ = predict(model, image_batches(data, BatchOrder(len(data), 2, False)), CPU)
    return probs


def test_timm_blocks_come_from_feature_info_and_the_tail_is_checked() -> None:
    from twophase.backbones import ArchError, check_tail

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
