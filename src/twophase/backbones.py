"""Every supported torchvision family, described once: its blocks, its classifier, its layout.

The network is always the torchvision model itself; a family only says where things are in it,
under the model's own module names:
- `blocks`: the blocks in forward order (a container whose children they are, or their names);
  phase 2 unfreezes the last N of them, and the features stage caches the input of the first;
- `after`: what runs between the last block and the classifier (pooling, norms, flatten), as
  module names or one of the steps in `STEPS`; its output is the embedding the head reads;
- `classifier`: the module the MLP head replaces;
- `layout`: how a block's input is shaped: "nchw" feature maps (cached channels-last), "nhwc"
  (Swin's own layout) or "tokens" (ViT, N x T x D).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

Layout = Literal["nchw", "nhwc", "tokens"]

STEPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "flatten": lambda x: torch.flatten(x, 1),
    "class_token": lambda x: x[:, 0],  # ViT's classifier reads the class token only
}


@dataclass(frozen=True)
class Family:
    name: str
    pattern: str  # a regular expression over torchvision's model names
    blocks: str | tuple[str, ...]
    after: tuple[str, ...]
    classifier: str
    layout: Layout
    recommended_unfreeze: str

    def matches(self, arch: str) -> bool:
        return re.fullmatch(self.pattern, arch) is not None


FAMILIES = (
    Family(
        "ResNet, ResNeXt, Wide ResNet",
        r"resnet\d+|resnext\d+_\d+x\d+d|wide_resnet\d+_2",
        ("layer1", "layer2", "layer3", "layer4"),
        ("avgpool", "flatten"),
        "fc",
        "nchw",
        "[layer4]",
    ),
    Family(
        "RegNet X and Y",
        r"regnet_[xy]_\w+",
        "trunk_output",
        ("avgpool", "flatten"),
        "fc",
        "nchw",
        "[trunk_output.block4]",
    ),
    Family(
        "ConvNeXt",
        r"convnext_\w+",
        "features",
        ("avgpool", "classifier.0", "classifier.1"),
        "classifier.2",
        "nchw",
        "[features.7]",
    ),
    Family(
        "EfficientNet and EfficientNetV2",
        r"efficientnet_(b\d|v2_[sml])",
        "features",
        ("avgpool", "flatten", "classifier.0"),
        "classifier.1",
        "nchw",
        "2 (the last stage and the final 1x1 conv)",
    ),
    Family(
        "MobileNetV3",
        r"mobilenet_v3_(small|large)",
        "features",
        ("avgpool", "flatten", "classifier.0", "classifier.1", "classifier.2"),
        "classifier.3",
        "nchw",
        "2",
    ),
    Family(
        "ViT",
        r"vit_[bhl]_\d+",
        "encoder.layers",
        ("encoder.ln", "class_token"),
        "heads.head",
        "tokens",
        "[encoder.layers.encoder_layer_11] (ViT-B)",
    ),
    Family(
        "Swin and Swin V2",
        r"swin_(v2_)?[tsb]",
        "features",
        ("norm", "permute", "avgpool", "flatten"),
        "head",
        "nhwc",
        "[features.7]",
    ),
)


class ArchError(ValueError):
    """model.arch names no supported model (subclassed by the params error type in model.py)."""


def supported_archs() -> list[str]:
    """torchvision's classification models of the supported families, by name."""
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    return [name for name in names if any(f.matches(name) for f in FAMILIES)]


def family_of(arch: str, check: bool = False) -> Family:
    """The family of `arch`; with `check`, also that torchvision has a model of that name."""
    family = next((f for f in FAMILIES if f.matches(arch)), None)
    if family is None or (check and arch not in supported_archs()):
        raise ArchError(
            f"model.arch: {arch!r} is not supported; expected one of {', '.join(supported_archs())}"
        )
    return family


def block_names(model: nn.Module, family: Family) -> list[str]:
    """The family's blocks in `model`, in forward order, under the model's own names."""
    if isinstance(family.blocks, tuple):
        return list(family.blocks)
    container = model.get_submodule(family.blocks)
    return [f"{family.blocks}.{name}" for name, _ in container.named_children()]


class Tail(nn.Module):
    """The part of a torchvision model from block `first` on: blocks, `after` steps, classifier.

    It shares the model's modules, so training it trains the model. With `first=None` it is the
    whole model (every block unfrozen: the cached input is the preprocessed image itself).
    """

    def __init__(
        self, model: nn.Module, family: Family, first: str | None, freeze_batchnorm: bool = False
    ) -> None:
        super().__init__()
        self.model, self.family, self.first = model, family, first
        self.freeze_batchnorm = freeze_batchnorm
        names = block_names(model, family)
        self.block_names = names[names.index(first) :] if first is not None else names

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.first is None:
            return self.model(x)  # type: ignore[no-any-return]
        for name in self.block_names:
            x = self.model.get_submodule(name)(x)
        for step in self.family.after:
            x = STEPS[step](x) if step in STEPS else self.model.get_submodule(step)(x)
        return self.model.get_submodule(self.family.classifier)(x)  # type: ignore[no-any-return]

    def trainable_modules(self) -> list[nn.Module]:
        if self.first is None:
            return [self.model]
        steps = [s for s in self.family.after if s not in STEPS]
        names = [*self.block_names, *steps, self.family.classifier]
        return [self.model.get_submodule(name) for name in names]

    def train(self, mode: bool = True) -> Tail:
        """Only the trainable part switches to train mode; the frozen part stays in eval mode."""
        self.model.eval()
        for module in self.trainable_modules():
            module.train(mode)
            if self.freeze_batchnorm:
                for layer in module.modules():
                    if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                        layer.eval()
        self.training = mode
        return self


def set_trainable(model: nn.Module, tail: Tail) -> None:
    """requires_grad on the tail's modules only: the frozen part gets no gradient."""
    model.requires_grad_(False)
    for module in tail.trainable_modules():
        module.requires_grad_(True)
