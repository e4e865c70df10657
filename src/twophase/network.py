"""The network cut at a block, and running it: what twophase trains and scores.

A cut is the first unfrozen block (`resolve_cut`; None: the input, every block trains). Above
it, `FrozenTrunk` runs the whole model once per image for the feature cache; from it, `Tail`
runs the rest of the model up to the logits on a cached activation, and `Streamed` runs both on
images, the frozen part without gradient. `set_trainable` and `discriminative_groups` say what
trains and at which learning rate; `predict` scores any of them in eval mode.

Every one of them shares the torchvision (or timm) model's own modules, so the weights trained
through a tail are the model's, saved under its own state-dict keys. Where the blocks are comes
from the family table (backbones.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from twophase.backbones import (
    FORWARD_HEAD,
    STEPS,
    ArchError,
    Family,
    Layout,
    describe,
)
from twophase.batches import Batches
from twophase.params import ParamsError
from twophase.runtime import autocast, to_device

ParamGroups = tuple[list[list[nn.Parameter]], list[float]]  # parameter lists, their LR scales


class FrozenTrunk(nn.Module):
    """The whole model up to its classifier, in eval mode: one pass gives both cached inputs.

    The embedding is what reaches the classifier; the activation is what enters block `cut`
    (caught by a forward pre-hook), or the image itself when every block trains (`cut=None`).
    Activations come out in their storage layout: feature maps channels-last (N, H, W, C).
    """

    def __init__(self, model: nn.Module, family: Family, cut: str | None) -> None:
        super().__init__()
        model.set_submodule(family.classifier, nn.Identity())
        self.model, self.cut = model, cut
        self.layout: Layout = "nchw" if cut is None else family.layout
        self._caught: torch.Tensor | None = None
        if cut is not None:
            model.get_submodule(cut).register_forward_pre_hook(self._catch)

    def _catch(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        self._caught = args[0]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embeddings = self.model(images)
        activations = images if self.cut is None else self._caught
        if activations is None:  # pragma: no cover - guards the family table
            raise RuntimeError(f"block {self.cut} was never reached")
        if self.layout == "nchw":
            activations = activations.permute(0, 2, 3, 1)
        return activations, embeddings


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


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def resolve_cut(arch: str, blocks: Sequence[str], unfreeze: Sequence[str]) -> str | None:
    """The first unfrozen block for `finetune.unfreeze` (None: every block, from the input on).

    `unfreeze` names the last blocks in the model's own terms, or is one integer N (the last N
    blocks), or `all`.
    """
    count = len(blocks)
    if tuple(unfreeze) == ("all",):
        return None
    if len(unfreeze) == 1 and unfreeze[0].isdigit() and 1 <= int(unfreeze[0]) <= count:
        return blocks[-int(unfreeze[0])]
    if len(set(unfreeze)) == len(unfreeze) and set(unfreeze) == set(blocks[-len(unfreeze) :]):
        return blocks[-len(unfreeze)]
    examples = f"[{blocks[-1]}] or [{blocks[-2]}, {blocks[-1]}]" if count > 1 else f"[{blocks[0]}]"
    raise ParamsError(
        f"finetune.unfreeze: {list(unfreeze)} is not allowed for {arch}; expected its last "
        f"blocks, e.g. {examples} (its blocks: {', '.join(blocks)}), an integer 1..{count}, "
        "or all"
    )


def discriminative_groups(tail: Tail, blocks: list[str], decay: float) -> ParamGroups:
    """Parameter groups for phase 2: each unfrozen block (its start up to the next block's, as
    `Family.block_members` says) at lr * decay**k, k = 1 for the last block, 2 for the one
    before, ...; what follows the last block (norms, pooling, the head) at the phase's LR and,
    when every block trains, what precedes the first (the stem, embeddings) one step below the
    first block. Every trainable parameter is in exactly one group. One group when decay is 1."""
    trainable = [p for p in tail.parameters() if p.requires_grad]
    if decay == 1.0:
        return [trainable], [1.0]
    first = blocks[0] if tail.first is None else tail.first
    members = tail.family.block_members(tail.model, first)
    placed: set[int] = set()
    stem: list[nn.Parameter] = []
    if tail.first is None:  # the stem: what the tail from the first block does not run
        runs = Tail(tail.model, tail.family, first).trainable_modules()
        from_first = {id(p) for module in runs for p in module.parameters()}
        stem = [p for p in trainable if id(p) not in from_first]
        placed.update(id(p) for p in stem)
    block_params: list[list[nn.Parameter]] = []
    for modules in reversed(members.values()):
        group = []
        for name in modules:
            for param in tail.model.get_submodule(name).parameters():
                if param.requires_grad and id(param) not in placed:
                    group.append(param)
                    placed.add(id(param))
        block_params.append(group)
    head = [p for p in trainable if id(p) not in placed]
    groups = [head, *block_params]
    scales = [decay**k for k in range(len(groups))]
    if tail.first is None:
        return [*groups, stem], [*scales, decay ** len(groups)]
    return groups, scales


def cached_input_model(model: nn.Module, checkpoint: dict[str, Any]) -> nn.Module:
    """The part of `model` that scores the cached input the checkpoint reads."""
    if checkpoint["reads"] == "embeddings":
        return model.get_submodule(checkpoint["classifier"])
    return Tail(model, describe(model, checkpoint["arch"]), checkpoint["cut"])


def predict(
    model: nn.Module,
    batches: Batches,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities, labels) over all batches, on the CPU."""
    model.to(device).to(memory_format=torch.channels_last).eval()
    probs, labels = [], []
    with torch.inference_mode():
        for inputs, targets in batches:
            with autocast(device, amp_dtype):
                logits = model(to_device(inputs, device))
            probs.append(torch.softmax(logits.float(), dim=1).cpu())
            labels.append(targets)
    return torch.cat(probs), torch.cat(labels)
