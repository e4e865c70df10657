"""The network: a pretrained torchvision backbone cut into named blocks, plus a new dense head.

Both phases and the feature cache use the same cut. The blocks before the first unfrozen one are
"frozen": they never train and run in eval mode, so their output can be computed once and cached.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from twophase.errors import TwophaseError
from twophase.params import ARCHS, BLOCKS

if TYPE_CHECKING:  # torchvision takes seconds to import: only where a backbone is built
    from torchvision.models import WeightsEnum

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsError(TwophaseError):
    """model.weights names nothing that can be loaded."""


@dataclass(frozen=True)
class Preprocessing:
    """What the weights were trained with: resize to `resize_ratio * image_size`, centre crop."""

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resize_ratio: float = 256 / 224


def weights_enum(arch: str, weights: str) -> WeightsEnum | None:
    """The torchvision weights named `weights`, or None for 'none' and local files."""
    if weights.lower() == "none" or _looks_like_path(weights):
        return None
    import torchvision

    enum = torchvision.models.get_model_weights(arch)
    name = weights.removeprefix(f"{enum.__name__}.")
    if name == "DEFAULT":
        default: WeightsEnum = enum.DEFAULT
        return default
    if name not in enum.__members__:
        names = ", ".join(["DEFAULT", *enum.__members__, "none", "<path to a .pt state dict>"])
        raise WeightsError(
            f"model.weights: {weights!r} is not a weights name for {arch}; expected one of {names}"
        )
    return enum[name]


def _looks_like_path(weights: str) -> bool:
    return "/" in weights or "\\" in weights or weights.endswith((".pt", ".pth", ".bin"))


def preprocessing(arch: str, weights: str) -> Preprocessing:
    enum = weights_enum(arch, weights)
    if enum is None:
        return Preprocessing()
    preset = enum.transforms()
    return Preprocessing(
        mean=tuple(preset.mean),
        std=tuple(preset.std),
        resize_ratio=preset.resize_size[0] / preset.crop_size[0],
    )


def build_backbone(arch: str, weights: str, progress: bool = True) -> nn.Module:
    """A torchvision ResNet with the requested weights, its fc removed."""
    if arch not in ARCHS:
        raise ValueError(f"model.arch: {arch!r} is not supported; expected one of {ARCHS}")
    import torchvision

    enum = weights_enum(arch, weights)
    net: nn.Module = torchvision.models.get_model(arch, weights=None)
    if enum is not None:
        net.load_state_dict(enum.get_state_dict(progress=progress, check_hash=True))
    elif weights.lower() != "none":
        try:
            result = net.load_state_dict(load_state_dict_file(Path(weights)), strict=False)
        except RuntimeError as err:  # right names, wrong shapes
            mismatch = next((line.strip() for line in str(err).splitlines() if "size" in line), "")
            raise WeightsError(
                f"model.weights: {weights!r} does not fit {arch} ({mismatch.rstrip('.')})"
            ) from None
        missing = [k for k in result.missing_keys if not k.startswith("fc.")]
        if missing or result.unexpected_keys:
            raise WeightsError(
                f"model.weights: {weights!r} does not fit {arch} "
                f"(missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})"
            )
    net.fc = nn.Identity()
    return net


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """A local state dict (plain, or a checkpoint dict with 'state_dict'/'model'), fc dropped."""
    if not path.is_file():
        raise WeightsError(f"model.weights: file {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise WeightsError(
            f"model.weights: {str(path)!r} is not a PyTorch weights file ({reason[:120]})"
        ) from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(
            f"model.weights: {str(path)!r} holds no state dict (a mapping of names to tensors)"
        )
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.startswith("fc.")}
    return state


def backbone_blocks(backbone: nn.Module) -> OrderedDict[str, nn.Module]:
    """The backbone as named blocks in forward order (see params.BLOCKS)."""
    b = backbone
    stem = nn.Sequential(b.conv1, b.bn1, b.relu, b.maxpool)  # type: ignore[arg-type]
    modules = [stem, b.layer1, b.layer2, b.layer3, b.layer4]
    return OrderedDict(zip(BLOCKS, modules, strict=True))  # type: ignore[arg-type]


STEM_LAYERS = ("conv1", "bn1")  # the stem's positions 0 and 1; relu and maxpool hold no state


def network_keys(backbone_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A torchvision ResNet state dict under `Network` names (conv1 -> blocks.stem.0, ...)."""
    renamed = {}
    for key, value in backbone_state.items():
        first, rest = key.split(".", 1)
        if first in STEM_LAYERS:
            renamed[f"blocks.stem.{STEM_LAYERS.index(first)}.{rest}"] = value
        elif first.startswith("layer"):
            renamed[f"blocks.{key}"] = value
    return renamed


def embedding_dim(backbone: nn.Module) -> int:
    return int(backbone.layer4[-1].conv1.in_channels)  # type: ignore[index, union-attr]


def build_head(
    in_features: int, dense_units: Sequence[int], dropout: float, num_classes: int
) -> nn.Sequential:
    """in → [Linear → ReLU → Dropout]* → Linear(num_classes); every Linear trains."""
    layers: list[nn.Module] = []
    width = in_features
    for units in dense_units:
        layers += [nn.Linear(width, units), nn.ReLU(inplace=True), nn.Dropout(dropout)]
        width = units
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


class Network(nn.Module):
    """blocks → (global average pool → flatten) → head, with some blocks frozen.

    Frozen blocks get `requires_grad=False` and stay in eval mode even under `.train()`, so their
    BatchNorm running statistics never move. With `freeze_batchnorm`, the BatchNorm layers of the
    trainable blocks stay in eval mode too (running statistics fixed, affine parameters train).
    With no blocks the input is already an embedding.
    """

    def __init__(
        self,
        blocks: OrderedDict[str, nn.Module],
        head: nn.Sequential,
        frozen: Iterable[str] = (),
        freeze_batchnorm: bool = False,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleDict(blocks)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()) if blocks else None
        self.head = head
        self.frozen: tuple[str, ...] = ()
        self.freeze_batchnorm = freeze_batchnorm
        self.set_frozen(frozen)

    def set_frozen(self, frozen: Iterable[str]) -> None:
        """Freeze exactly these blocks; every other block and the head train."""
        self.frozen = tuple(frozen)
        unknown = set(self.frozen) - set(self.blocks)
        if unknown:
            raise ValueError(f"cannot freeze unknown blocks {sorted(unknown)}")
        for name, block in self.blocks.items():
            block.requires_grad_(name not in self.frozen)
        self.head.requires_grad_(True)

    def train(self, mode: bool = True) -> Network:
        super().train(mode)
        for name in self.frozen:
            self.blocks[name].eval()
        if self.freeze_batchnorm:
            for module in self.blocks.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks.values():
            x = block(x)
        if self.pool is not None:
            x = self.pool(x)
        return self.head(x)  # type: ignore[no-any-return]


def full_network(
    arch: str,
    weights: str,
    dense_units: Sequence[int],
    dropout: float,
    num_classes: int,
    frozen: Iterable[str] = BLOCKS,
) -> Network:
    """Backbone (all blocks frozen by default) and a freshly initialised head."""
    backbone = build_backbone(arch, weights)
    head = build_head(embedding_dim(backbone), dense_units, dropout, num_classes)
    return Network(backbone_blocks(backbone), head, frozen=frozen)


def tail_of(network: Network, first_block: str | None) -> Network:
    """The part of `network` from `first_block` on (None: the head alone), sharing its modules."""
    names = list(network.blocks)
    kept = names[names.index(first_block) :] if first_block is not None else []
    frozen = tuple(name for name in network.frozen if name in kept)
    blocks = OrderedDict((n, network.blocks[n]) for n in kept)
    return Network(blocks, network.head, frozen, network.freeze_batchnorm)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
