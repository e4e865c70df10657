"""Every supported torchvision family, described once: its blocks, its classifier, its layout.

The network is always the torchvision model itself; a family only says where things are in it,
under the model's own module names:
- `blocks`: the blocks in forward order, as their names or as a container and `starts`, the
  indices of its children where blocks start (every child when empty); phase 2 unfreezes the
  last N of them, and the features stage caches the input of the first. A block is a resolution
  stage, as ResNet's `layer1` … `layer4` (`layer4` holds its own downsampling): it runs from its
  start to the next block's, so a downsampling layer starts the block after it (ConvNeXt's
  `features.6` with `features.7`) and the children after the last start (EfficientNet's final
  1x1 conv) belong to the last block; the children before the first start are the stem, which
  trains only with `unfreeze: all`. A block is named after its first module;
- `after`: what runs between the last block and the classifier (pooling, norms, flatten), as
  module names or one of the steps in `STEPS`; its output is the embedding the head reads;
- `classifier`: the module the MLP head replaces;
- `layout`: how a block's input is shaped: "nchw" feature maps (cached channels-last), "nhwc"
  (Swin's own layout) or "tokens" (ViT, N x T x D); "native": cached as the model makes it;
- `drop_path`: the family's stochastic depth rate as its library names it (torchvision's
  `stochastic_depth_prob`, timm's `drop_path_rate`), or None where it has none (ResNets):
  `model.drop_path` is refused for such a family.

timm models (`model.arch: timm/<name>`, optional extra) describe themselves: `timm_family`
reads the blocks from the model's `feature_info` (the module that ends each resolution stage),
the classifier from its pretrained config and what runs after the blocks from the order in
which `forward_features` calls its modules.

The table only describes; cutting the model at a block and running the parts is network.py's.
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
TIMM_DROP_PATH = "drop_path_rate"  # timm's builder argument for stochastic depth
TORCHVISION_DROP_PATH = "stochastic_depth_prob"

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
    starts: tuple[int, ...] = ()  # the container's children where blocks start; (): every child
    drop_path: str | None = None  # the stochastic depth rate's name in the library; None: none

    def matches(self, arch: str) -> bool:
        return re.fullmatch(self.pattern, arch) is not None

    def tail_steps(self, model: nn.Module, first: str) -> list[str]:
        """What runs from module `first` (a block, or any child of the block container) to the
        logits: module names, keys of `STEPS`, or FORWARD_HEAD. For timm, `after` is the order
        of every top-level module in `forward_features`, and a module inside a container brings
        its later siblings along."""
        if self.name != "timm":
            blocks = self.blocks
            chain = list(blocks) if isinstance(blocks, tuple) else _children(model, blocks)
            return [*chain[chain.index(first) :], *self.after, self.classifier]
        order = list(self.after)
        parent, _, child = first.rpartition(".")
        if parent in order:
            siblings = [name for name, _ in model.get_submodule(parent).named_children()]
            steps = [f"{parent}.{n}" for n in siblings[siblings.index(child) :]]
            steps += order[order.index(parent) + 1 :]
        else:
            steps = order[order.index(first) :] if first in order else [first]
        return [*steps, FORWARD_HEAD]

    def block_members(self, model: nn.Module, first: str) -> dict[str, list[str]]:
        """The modules of each block from block `first` on, by block, in forward order.

        A block holds its start, what follows it in its container up to the next start
        (EfficientNet's `features.7` and final conv `features.8` belong to `features.6`) and
        whatever else runs before the next block (timm ResNet's `maxpool` belongs to `act1`).
        What follows the last block outside its container (norms, pooling, the head) belongs to
        no block: discriminative LRs give it the head's.
        """
        starts = set(block_names(model, self))
        steps = [s for s in self.tail_steps(model, first) if s not in STEPS and s != FORWARD_HEAD]
        steps = _expanded(model, steps, starts)
        last = max(i for i, step in enumerate(steps) if step in starts | {first})
        container = steps[last].rpartition(".")[0]  # "": a top-level block brings nothing along
        members: dict[str, list[str]] = {first: []}
        current = first
        for i, step in enumerate(steps):
            if step in starts:
                current = step
                members.setdefault(current, [])
            elif i > last and not (container and step.rpartition(".")[0] == container):
                break  # past the last block: what follows its container
            members[current].append(step)
        return members


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
        starts=(1, 2, 4, 6),  # features.2, .4, .6 downsample; .0 is the stem
        drop_path=TORCHVISION_DROP_PATH,
    ),
    Family(
        "EfficientNet and EfficientNetV2",
        r"efficientnet_(b\d|v2_[sml])",
        "features",
        ("avgpool", "flatten", "classifier.0"),
        "classifier.1",
        "nchw",
        starts=(1, 2, 3, 4, 6),  # .1 runs at the stem's resolution; the final 1x1 conv joins .6
        drop_path=TORCHVISION_DROP_PATH,
    ),
    Family(
        "MobileNetV3-Large",
        r"mobilenet_v3_large",
        "features",
        ("avgpool", "flatten", "classifier.0", "classifier.1", "classifier.2"),
        "classifier.3",
        "nchw",
        starts=(1, 2, 4, 7, 13),  # .1 runs at the stem's resolution; the final 1x1 conv joins .13
    ),
    Family(
        "MobileNetV3-Small",
        r"mobilenet_v3_small",
        "features",
        ("avgpool", "flatten", "classifier.0", "classifier.1", "classifier.2"),
        "classifier.3",
        "nchw",
        starts=(1, 2, 4, 9),  # every start downsamples; the final 1x1 conv joins .9
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
        starts=(1, 2, 4, 6),  # features.2, .4, .6 are the patch merging layers; .0 is the stem
        drop_path=TORCHVISION_DROP_PATH,
    ),
)


class ArchError(ValueError):
    """model.arch names no supported model (model.check_arch reports it as a params error)."""


@cache
def supported_archs() -> tuple[str, ...]:
    """torchvision's classification models of the supported families, by name."""
    import torchvision  # imported only here: it imports torch._dynamo, phase 1 never needs it

    names = torchvision.models.list_models(module=torchvision.models)
    return tuple(name for name in names if any(f.matches(name) for f in FAMILIES))


def family_of(arch: str, check: bool = False) -> Family:
    """The family of a torchvision `arch`; with `check`, also that torchvision has that name."""
    family = next((f for f in FAMILIES if f.matches(arch)), None)
    if family is None or (check and arch not in supported_archs()):
        import difflib  # only on this error

        names = supported_archs()
        closest = difflib.get_close_matches(arch, names, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(closest)}?" if closest else ""
        raise ArchError(
            f"model.arch: {arch!r} is not supported{hint} (docs/backbones.md lists the "
            f"{len(names)} torchvision models; or {TIMM_PREFIX}<name> for a timm model)"
        )
    return family


def describe(model: nn.Module, arch: str) -> Family:
    """The family of `model`: from the table for torchvision, read off the model for timm."""
    return timm_family(model, arch) if arch.startswith(TIMM_PREFIX) else family_of(arch)


def timm_family(model: nn.Module, arch: str) -> Family:
    """A timm model's blocks (its `feature_info` stages), classifier and trailing modules.

    The modules `forward_features` calls after the blocks are found by watching one forward
    pass; the features stage then checks that the tail computed this way gives the model's own
    output (`network.check_tail`), so a model whose forward is not such a chain is refused, not run.
    """
    classifier = model.pretrained_cfg.get("classifier")  # type: ignore[union-attr, operator]
    feature_info = getattr(model, "feature_info", None)
    if not isinstance(classifier, str) or not feature_info:
        raise ArchError(
            f"model.arch: {arch!r} names no feature_info stages or a single classifier: "
            "not supported"
        )
    blocks = tuple(_stage_starts(model, [str(info["module"]) for info in feature_info]))
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
        drop_path=TIMM_DROP_PATH,
    )


def _stage_starts(model: nn.Module, ends: list[str]) -> list[str]:
    """Where each of a timm model's blocks starts, given the module that ends each one.

    `feature_info` names the last module of each resolution stage (efficientnet_b0: `blocks.0`,
    `.1`, `.2`, `.4`, `.6`). When the previous stage ends in the same container, a stage starts
    right after it (`blocks.5` starts the stage `blocks.5`, `blocks.6`); otherwise (the first
    stage, or a stage after a top-level one, as timm ResNet's `layer1` after the stem's `act1`)
    it starts at its own module, and what runs before it belongs to the block before.
    """
    starts = []
    for previous, end in zip(["", *ends[:-1]], ends, strict=True):
        parent, _, _ = end.rpartition(".")
        previous_parent, _, previous_child = previous.rpartition(".")
        if parent and previous_parent == parent:
            siblings = [name for name, _ in model.get_submodule(parent).named_children()]
            starts.append(f"{parent}.{siblings[siblings.index(previous_child) + 1]}")
        else:
            starts.append(end)
    return starts


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
    """The family's blocks in `model`, in forward order, under the names of their first modules:
    the listed modules, or the container's children at `starts` (every child when empty)."""
    if isinstance(family.blocks, tuple):
        return list(family.blocks)
    children = _children(model, family.blocks)
    return [children[i] for i in family.starts] if family.starts else children


def _children(model: nn.Module, container: str) -> list[str]:
    """The full names of a container's children, in order."""
    return [f"{container}.{name}" for name, _ in model.get_submodule(container).named_children()]


def _expanded(model: nn.Module, steps: list[str], starts: set[str]) -> list[str]:
    """`steps` with every module that holds a block replaced by its children (timm's whole
    `blocks` container runs as one step after a top-level block such as GhostNet's conv_stem)."""
    expanded: list[str] = []
    for step in steps:
        if any(start.startswith(f"{step}.") for start in starts):
            expanded += _expanded(model, _children(model, step), starts)
        else:
            expanded.append(step)
    return expanded
