"""A block is a resolution stage, `unfreeze: N` counts such stages in every family, and
discriminative LRs give every trainable parameter the LR of the block it belongs to.

One small model per family (weights none). The expected LRs are worked out here from parameter
names alone: a parameter belongs to the block that starts at or before its unit (a child of the
block container, or a top-level block), the stem is what comes before the first block, and what
is in no unit (norms, pooling, the head) trains at the phase's LR.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from twophase.backbones import Family, block_names, describe
from twophase.model import build_head, build_model, classifier_in_features
from twophase.network import Tail, check_tail, discriminative_groups, resolve_cut, set_trainable
from twophase.optim import make_optimizer
from twophase.params import ParamsError, PhaseParams


@dataclass(frozen=True)
class Spec:
    units: str | tuple[str, ...]  # the block container, or the units in forward order
    blocks: tuple[str, ...]  # where blocks start, among the units
    stem: tuple[str, ...] = ()  # parameter-name prefixes outside the units that precede them
    two: str = ""  # what `unfreeze: 2` trains, by block ("|"): the last block is `unfreeze: 1`


def features(*indices: int) -> tuple[str, ...]:
    return tuple(f"features.{i}" for i in indices)


SPECS = {
    "resnet18": Spec(
        ("layer1", "layer2", "layer3", "layer4"),
        ("layer1", "layer2", "layer3", "layer4"),
        ("conv1.", "bn1."),
        "layer3 | layer4",
    ),
    "regnet_y_400mf": Spec(
        "trunk_output",
        tuple(f"trunk_output.block{i}" for i in range(1, 5)),
        ("stem.",),
        "trunk_output.block3 | trunk_output.block4",
    ),
    "convnext_tiny": Spec(
        "features", features(1, 2, 4, 6), two="features.4 features.5 | features.6 features.7"
    ),
    "efficientnet_b0": Spec(
        "features",
        features(1, 2, 3, 4, 6),
        two="features.4 features.5 | features.6 features.7 features.8",
    ),
    "efficientnet_v2_s": Spec(
        "features", features(1, 2, 3, 4, 6), two="features.4 features.5 | features.6 features.7"
    ),
    "mobilenet_v3_small": Spec(
        "features",
        features(1, 2, 4, 9),
        two="features.4 features.5 features.6 features.7 features.8"
        " | features.9 features.10 features.11 features.12",
    ),
    "mobilenet_v3_large": Spec(
        "features",
        features(1, 2, 4, 7, 13),
        two="features.7 features.8 features.9 features.10 features.11 features.12"
        " | features.13 features.14 features.15 features.16",
    ),
    "vit_b_16": Spec(
        "encoder.layers",
        tuple(f"encoder.layers.encoder_layer_{i}" for i in range(12)),
        ("conv_proj.", "class_token", "encoder.pos_embedding"),
        "encoder.layers.encoder_layer_10 | encoder.layers.encoder_layer_11",
    ),
    "swin_t": Spec(
        "features", features(1, 2, 4, 6), two="features.4 features.5 | features.6 features.7"
    ),
    "timm/efficientnet_b0": Spec(
        "blocks",
        ("blocks.0", "blocks.1", "blocks.2", "blocks.3", "blocks.5"),
        ("conv_stem.", "bn1."),
        "blocks.3 blocks.4 | blocks.5 blocks.6",
    ),
    "timm/convnext_atto": Spec(
        "stages",
        ("stages.0", "stages.1", "stages.2", "stages.3"),
        ("stem.",),
        "stages.2 | stages.3",
    ),
    "timm/resnet18": Spec(
        ("act1", "maxpool", "layer1", "layer2", "layer3", "layer4"),
        ("act1", "layer1", "layer2", "layer3", "layer4"),
        ("conv1.", "bn1."),
        "layer3 | layer4",
    ),
}
DECAY = 0.5


@dataclass
class Network:
    arch: str
    model: nn.Module
    family: Family
    spec: Spec

    def units(self) -> list[str]:
        units = self.spec.units
        if isinstance(units, tuple):
            return list(units)
        return [f"{units}.{name}" for name, _ in self.model.get_submodule(units).named_children()]

    def cut(self, unfreeze: str) -> str | None:
        return resolve_cut(self.arch, block_names(self.model, self.family), [unfreeze])


@pytest.fixture(scope="module", params=list(SPECS))
def network(request: pytest.FixtureRequest) -> Iterator[Network]:
    """The arch with an MLP head in place of its classifier, as phase 2 trains it (one build per
    arch: module scope groups the tests by arch)."""
    arch = request.param
    torch.manual_seed(0)
    model = build_model(arch, "none", 32)
    family = describe(model, arch)
    width = classifier_in_features(model, family)
    model.set_submodule(family.classifier, build_head(width, [16], 0.0, 3))
    yield Network(arch, model, family, SPECS[arch])


def test_blocks_are_named_after_their_first_module(network: Network) -> None:
    assert block_names(network.model, network.family) == list(network.spec.blocks)


# timm's blocks are its own feature_info stages, and a ViT keeps one resolution throughout
RESOLUTION_STAGED = [a for a in SPECS if not a.startswith(("timm/", "vit_"))]


@pytest.mark.parametrize("network", RESOLUTION_STAGED, indirect=True)
def test_a_block_is_a_resolution_stage(network: Network) -> None:
    """Every unit after the stem that lowers the resolution starts a block, and every block but
    the first starts with one (the first may run at the stem's resolution: EfficientNet's
    features.1, as timm's first efficientnet stage)."""
    assert network.family.layout != "tokens", network.arch
    sizes: dict[str, tuple[int, int]] = {}
    height = 1 if network.family.layout == "nhwc" else 2  # Swin's blocks run N x H x W x C

    def record(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[torch.Tensor], out: torch.Tensor) -> None:
            sizes[name] = (args[0].shape[height], out.shape[height])

        return hook

    units = network.units()
    hooks = [network.model.get_submodule(u).register_forward_hook(record(u)) for u in units]
    try:
        with torch.inference_mode():
            network.model.eval()(torch.zeros(1, 3, 64, 64))
    finally:
        for hook in hooks:
            hook.remove()
    after_stem = units[units.index(network.spec.blocks[0]) :]
    lowering = [u for u in after_stem if sizes[u][1] < sizes[u][0]]
    assert set(lowering) <= set(network.spec.blocks)
    assert set(network.spec.blocks[1:]) <= set(lowering)


@pytest.mark.parametrize("unfreeze", ["1", "2"])
def test_unfreeze_one_and_two_train_the_last_stages(network: Network, unfreeze: str) -> None:
    cut = network.cut(unfreeze)
    assert cut is not None
    members = network.family.block_members(network.model, cut)
    expected = network.spec.two.split(" | ")[-int(unfreeze) :]
    assert [" ".join(modules) for modules in members.values()] == expected
    assert cut == expected[0].split()[0]  # the cache holds the input of the block's first module
    if unfreeze == "2":  # the tail from the new cut is a chain (from `1`'s: test_backbones)
        check_tail(network.model, network.family, cut, 32, network.arch)


def expected_scales(network: Network, unfreeze: str) -> dict[str, float | None]:
    """Each parameter's LR scale by its name, None when it is frozen."""
    units, blocks = network.units(), network.spec.blocks
    count = len(blocks) if unfreeze == "all" else int(unfreeze)
    scales: dict[str, float | None] = {}
    for name, _ in network.model.named_parameters():
        unit = next((u for u in units if name.startswith(f"{u}.")), None)
        if unit is not None:  # the block that starts at or before its unit (-1: the stem)
            block = sum(units.index(b) <= units.index(unit) for b in blocks) - 1
        else:
            block = -1 if name.startswith(network.spec.stem) else len(blocks)
        frozen = unfreeze != "all" and block < len(blocks) - count
        scales[name] = None if frozen else DECAY ** (len(blocks) - block)
    return scales


def by_unit(network: Network, scales: dict[str, float | None]) -> dict[str, object]:
    """The scales per unit (container child, top-level block, or module): readable diffs."""
    grouped: dict[str, set[float | None]] = {}
    for name, scale in scales.items():
        unit = next((u for u in network.units() if name.startswith(f"{u}.")), None)
        grouped.setdefault(unit or name.rpartition(".")[0] or name, set()).add(scale)
    return {unit: s.pop() if len(s) == 1 else sorted(s, key=str) for unit, s in grouped.items()}


@pytest.mark.parametrize("unfreeze", ["1", "2", "all"])
def test_every_trainable_parameter_gets_the_lr_of_its_block(
    network: Network, unfreeze: str
) -> None:
    model, family = network.model, network.family
    tail = Tail(model, family, network.cut(unfreeze))
    set_trainable(model, tail)
    groups, scales = discriminative_groups(tail, block_names(model, family), DECAY)
    optimizer = make_optimizer(groups, PhaseParams(lr=1.0), scales)
    placed: dict[int, list[float]] = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            placed.setdefault(id(param), []).append(group["scale"])
    assert all(len(found) == 1 for found in placed.values()), "a parameter in two groups"
    names = {id(p): name for name, p in model.named_parameters()}
    assert set(placed) <= set(names), "a parameter that is not the model's"
    actual = {
        name: placed[id(p)][0] if p.requires_grad else None for name, p in model.named_parameters()
    }
    assert all(p.requires_grad == (id(p) in placed) for p in model.parameters()), "one missing"
    expected = expected_scales(network, unfreeze)
    assert by_unit(network, actual) == by_unit(network, expected)
    assert actual == expected
    one, same = discriminative_groups(tail, block_names(model, family), 1.0)
    assert same == [1.0] and {id(p) for p in one[0]} == set(placed)


def test_a_module_inside_a_block_is_not_a_block_and_the_error_lists_the_blocks() -> None:
    blocks = list(SPECS["convnext_tiny"].blocks)
    with pytest.raises(ParamsError) as caught:
        resolve_cut("convnext_tiny", blocks, ["features.7"])
    assert "[features.6] or [features.4, features.6]" in str(caught.value)
    assert "(its blocks: features.1, features.2, features.4, features.6)" in str(caught.value)
