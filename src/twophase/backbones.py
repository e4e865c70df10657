"""Every supported torchvision family, described once: its blocks, its classifier, its layout.

The network is always the torchvision model itself; a family only says where things are in it,
under the model's own module names:
- `blocks`: the blocks in forward order (a container whose children they are, or their names);
  phase 2 unfreezes the last N of them, and the features stage caches the input of the first;
- `after`: what runs between the last block and the classifier (pooling, norms, flatten), as
  module names or one of the steps in `STEPS`; its output is the embedding the head reads;
- `classifier`: the module the MLP head replaces;
- `layout`: how a block's input is shaped: "nchw" feature maps (cached channels-last), "nhwc"
  (Swin's own layout) or "tokens" (ViT, N x T x D); "native": cached as the model makes it.

timm models (`model.arch: timm/<name>`, optional extra) describe themselves: `timm_family`
reads the blocks from the model's `feature_info`, the classifier from its pretrained config and
what runs after the blocks from the order in which `forward_features` calls its modules.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Literal

import torch
from torch import nn

Layout = Literal["nchw", "nhwc", "tokens", "native"]
TIMM_PREFIX = "timm/"

STEPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "flatten": lambda x: torch.flatten(x, 1),
    "class_token": lambda x: x[:, 0],  # ViT's classifier reads the class token only
}
FORWARD_HEAD = "forward_head"  # timm: pooling, norms and the classifier, as the model does them


@dataclass(frozen=True)
class Family:
    name: str
    pattern: str  # a regular expression over torchvision's model names
    blocks: str | tuple[str, ...]
    after: tuple[str, ...]
    classifier: str
    layout: Layout
    head_modules: tuple[str, ...] = ()  # timm: the top-level modules `forward_head` runs

    def matches(self, arch: str) -> bool:
        return re.fullmatch(self.pattern, arch) is not None

    def tail_steps(self, model: nn.Module, first: str) -> list[str]:
        """What runs from block `first` to the logits: module names, keys of `STEPS`, or
        FORWARD_HEAD. For timm, `after` is the order of every top-level module in
        `forward_features`, and a block inside a container brings its later siblings along."""
        if self.name != "timm":
            names = block_names(model, self)
            return [*names[names.index(first) :], *self.after, self.classifier]
        order = list(self.after)
        parent, _, child = first.rpartition(".")
        if parent in order:
            siblings = [name for name, _ in model.get_submodule(parent).named_children()]
            steps = [f"{parent}.{n}" for n in siblings[siblings.index(child) :]]
            steps += order[order.index(parent) + 1 :]
        else:
            steps = order[order.index(first) :] if first in order else [first]
        return [*steps, FORWARD_HEAD]


FAMILIES = (
    Family(
        "ResNet, ResNeXt, Wide ResNet",
        r"resnet\d+|resnext\d+_\d+x\d+d|wide_resnet\d+_2",
        ("layer1", "layer2", "layer3", "layer4"),
        ("avgpool", "flatten"),
        "fc",
        "nchw",
    ),
    Family(
        "RegNet X and Y",
        r"regnet_[xy]_\w+",
        "trunk_output",
        ("avgpool", "flatten"),
        "fc",
        "nchw",
    ),
    Family(
        "ConvNeXt",
        r"convnext_\w+",
        "features",
        ("avgpool", "classifier.0", "classifier.1"),
        "classifier.2",
        "nchw",
    ),
    Family(
        "EfficientNet and EfficientNetV2",
        r"efficientnet_(b\d|v2_[sml])",
        "features",
        ("avgpool", "flatten", "classifier.0"),
        "classifier.1",
        "nchw",
    ),
    Family(
        "MobileNetV3",
        r"mobilenet_v3_(small|large)",
        "features",
        ("avgpool", "flatten", "classifier.0", "classifier.1", "classifier.2"),
        "classifier.3",
        "nchw",
    ),
    Family(
        "ViT",
        r"vit_[bhl]_\d+",
        "encoder.layers",
        ("encoder.ln", "class_token"),
        "heads.head",
        "tokens",
    ),
    Family(
        "Swin and Swin V2",
        r"swin_(v2_)?[tsb]",
        "features",
        ("norm", "permute", "avgpool", "flatten"),
        "head",
        "nhwc",
    ),
)


class ArchError(ValueError):
    """model.arch names no supported model (subclassed by the params error type in model.py)."""


@cache
def supported_archs() -> tuple[str, ...]:
    """torchvision's classification models of the supported families, by name."""
    import torchvision  # 1.3 s (it imports torch._dynamo): phase 1 never needs it

    names = torchvision.models.list_models(module=torchvision.models)
    return tuple(name for name in names if any(f.matches(name) for f in FAMILIES))


def family_of(arch: str, check: bool = False) -> Family:
    """The family of a torchvision `arch`; with `check`, also that torchvision has that name."""
    family = next((f for f in FAMILIES if f.matches(arch)), None)
    if family is None or (check and arch not in supported_archs()):
        raise ArchError(
            f"model.arch: {arch!r} is not supported; expected one of {', '.join(supported_archs())}"
            f", or {TIMM_PREFIX}<name> for a timm model"
        )
    return family


def describe(model: nn.Module, arch: str) -> Family:
    """The family of `model`: from the table for torchvision, read off the model for timm."""
    return timm_family(model, arch) if arch.startswith(TIMM_PREFIX) else family_of(arch)


def timm_family(model: nn.Module, arch: str) -> Family:
    """A timm model's blocks (its `feature_info` modules), classifier and trailing modules.

    The modules `forward_features` calls after the blocks are found by watching one forward
    pass; the features stage then checks that the tail computed this way gives the model's own
    output (`check_tail`), so a model whose forward is not such a chain is refused, not run.
    """
    classifier = model.pretrained_cfg.get("classifier")  # type: ignore[union-attr, operator]
    feature_info = getattr(model, "feature_info", None)
    if not isinstance(classifier, str) or not feature_info:
        raise ArchError(
            f"model.arch: {arch!r} names no feature_info stages or a single classifier: "
            "not supported"
        )
    blocks = tuple(str(info["module"]) for info in feature_info)
    order = _forward_features_order(model)
    head_modules = tuple(name for name, _ in model.named_children() if name not in order)
    return Family(
        "timm",
        re.escape(arch),
        blocks,
        tuple(order),
        classifier,
        "native",
        head_modules,
    )


def _forward_features_order(model: nn.Module) -> list[str]:
    """Top-level children in the order `forward_features` first calls them (one blank pass)."""
    order: list[str] = []
    hooks = [
        child.register_forward_hook(lambda *_, name=name: order.append(name))
        for name, child in model.named_children()
    ]
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))  # type: ignore[union-attr, operator]
    was_training = model.training
    try:
        with torch.inference_mode():
            model.eval().forward_features(torch.zeros(1, *size))  # type: ignore[operator]
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return list(dict.fromkeys(order))


def block_names(model: nn.Module, family: Family) -> list[str]:
    """The family's blocks in `model`, in forward order, under the model's own names.

    A block that is one of several children of a container (timm's `blocks.4` among
    `blocks.0..6`) brings its unnamed siblings after it into the tail: they run after it.
    """
    if isinstance(family.blocks, tuple):
        return list(family.blocks)
    container = model.get_submodule(family.blocks)
    return [f"{family.blocks}.{name}" for name, _ in container.named_children()]


def check_tail(model: nn.Module, family: Family, cut: str, image_size: int, arch: str) -> None:
    """The tail from `cut` must give what the whole model gives (checked once, on noise)."""
    caught: list[torch.Tensor] = []
    hook = model.get_submodule(cut).register_forward_pre_hook(lambda _, a: caught.append(a[0]))
    torch.manual_seed(0)
    images = torch.randn(2, 3, image_size, image_size)
    try:
        with torch.inference_mode():
            whole = model.eval()(images)
            tail = Tail(model, family, cut).eval()(caught[0])
        same = torch.allclose(whole, tail, atol=1e-4, rtol=1e-4)
    except Exception:  # e.g. a block that takes several branches' outputs (HRNet)
        same = False
    finally:
        hook.remove()
    if not same:
        raise ArchError(
            f"model.arch: {arch!r} is not supported: its forward after {cut} is not a chain of "
            "modules twophase can run from a cached activation"
        )


class Tail(nn.Module):
    """The part of a model from block `first` on, up to the logits.

    It shares the model's modules, so training it trains the model. With `first=None` it is the
    whole model (every block unfrozen: the cached input is the preprocessed image itself).
    """

    def __init__(
        self, model: nn.Module, family: Family, first: str | None, freeze_batchnorm: bool = False
    ) -> None:
        super().__init__()
        self.model, self.family, self.first = model, family, first
        self.freeze_batchnorm = freeze_batchnorm
        self.steps = family.tail_steps(model, first) if first is not None else []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.first is None:
            return self.model(x)  # type: ignore[no-any-return]
        for step in self.steps:
            if step == FORWARD_HEAD:
                x = self.model.forward_head(x)  # type: ignore[operator]
            elif step in STEPS:
                x = STEPS[step](x)
            else:
                x = self.model.get_submodule(step)(x)
        return x

    def trainable_modules(self) -> list[nn.Module]:
        if self.first is None:
            return [self.model]
        names = [s for s in self.steps if s not in STEPS and s != FORWARD_HEAD]
        if FORWARD_HEAD in self.steps:
            names += list(self.family.head_modules)
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


class _Reached(Exception):
    def __init__(self, activation: torch.Tensor) -> None:
        self.activation = activation


class Streamed(nn.Module):
    """The whole network on images: what the activations cache stands for, computed anew.

    The frozen part runs without gradient (and in eval mode: `Tail.train` keeps it there) up to
    the tail's first block, where the forward pass is stopped; the tail then runs as on cached
    activations, so both paths compute the same function.
    """

    def __init__(self, tail: Tail) -> None:
        super().__init__()
        self.tail, self._stopping = tail, False
        if tail.first is not None:
            tail.model.get_submodule(tail.first).register_forward_pre_hook(self._stop)

    def _stop(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        if self._stopping:
            raise _Reached(args[0])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.tail.first is None:
            return self.tail(images)  # type: ignore[no-any-return]
        self._stopping = True
        try:
            with torch.no_grad():
                self.tail.model(images)
        except _Reached as reached:
            activation = reached.activation
        else:  # pragma: no cover - guards the family table
            raise RuntimeError(f"block {self.tail.first} was never reached")
        finally:
            self._stopping = False
        return self.tail(activation)  # type: ignore[no-any-return]

    def train(self, mode: bool = True) -> Streamed:
        self.tail.train(mode)
        self.training = mode
        return self


def set_trainable(model: nn.Module, tail: Tail) -> None:
    """requires_grad on the tail's modules only: the frozen part gets no gradient."""
    model.requires_grad_(False)
    for module in tail.trainable_modules():
        module.requires_grad_(True)
