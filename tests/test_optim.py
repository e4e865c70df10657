"""twophase.optim.Optimizer steps exactly as torch.optim's classes do, without importing dynamo."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from twophase.optim import Optimizer, make_optimizer
from twophase.params import PhaseParams


def two_groups(seed: int) -> tuple[nn.Module, list[list[nn.Parameter]]]:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    net[0].bias.requires_grad_(False)  # a parameter that never has a gradient
    first = [p for p in net[0].parameters() if p.requires_grad]
    return net, [first, list(net[2].parameters())]


def train(net: nn.Module, optimizer: Optimizer | torch.optim.Optimizer, steps: int = 6) -> None:
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        inputs = torch.randn(8, 6, generator=generator)
        labels = torch.randint(0, 3, (8,), generator=generator)
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(net(inputs), labels).backward()
        optimizer.step()


def torch_optimizer(groups: list[dict], phase: PhaseParams) -> torch.optim.Optimizer:
    if phase.optimizer == "sgd":
        return torch.optim.SGD(
            groups,
            lr=phase.lr,
            momentum=phase.momentum,
            nesterov=phase.nesterov,
            weight_decay=phase.weight_decay,
        )
    kind = torch.optim.AdamW if phase.optimizer == "adamw" else torch.optim.Adam
    return kind(groups, lr=phase.lr, weight_decay=phase.weight_decay)


@pytest.mark.parametrize(
    "phase",
    [
        PhaseParams(lr=0.01),
        PhaseParams(lr=0.01, weight_decay=0.05),
        PhaseParams(lr=0.01, optimizer="adamw", weight_decay=0.05),
        PhaseParams(lr=0.1, optimizer="sgd", momentum=0.9, nesterov=True, weight_decay=1e-3),
        PhaseParams(lr=0.1, optimizer="sgd", momentum=0.0),
    ],
    ids=["adam", "adam-l2", "adamw", "sgd-nesterov", "sgd-plain"],
)
def test_every_update_equals_torch_optim_bit_for_bit(phase: PhaseParams) -> None:
    ours, our_groups = two_groups(seed=0)
    theirs, their_groups = two_groups(seed=0)
    scales = [0.1, 1.0]
    train(ours, make_optimizer(our_groups, phase, scales))
    reference = torch_optimizer(
        [
            {"params": members, "lr": phase.lr * s, "weight_decay": decay}
            for g, s in zip(their_groups, scales, strict=True)
            for members, decay in (
                ([p for p in g if p.ndim > 1], phase.weight_decay),
                ([p for p in g if p.ndim <= 1], 0.0),  # biases: no decay
            )
            if members
        ],
        phase,
    )
    train(theirs, reference)
    for (name, mine), (_, expected) in zip(
        ours.state_dict().items(), theirs.state_dict().items(), strict=True
    ):
        assert torch.equal(mine, expected), name
    assert not torch.equal(ours[0].bias, two_groups(seed=1)[0][0].bias)  # seeds differ at all


@pytest.mark.parametrize("kind", ["adam", "adamw", "sgd"])
def test_weight_decay_spares_norm_scales_and_biases(kind: str) -> None:
    """With no gradient from the loss, decay alone moves the weights: matrices and kernels
    shrink, BatchNorm/LayerNorm scales and shifts and every bias stay as they are."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LayerNorm(4 * 36))
    before = {name: p.detach().clone() for name, p in net.named_parameters()}
    optimizer = make_optimizer(
        [list(net.parameters())], PhaseParams(lr=0.1, optimizer=kind, weight_decay=0.5)
    )
    for _ in range(3):
        optimizer.zero_grad(set_to_none=False)
        for p in net.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()
    for name, p in net.named_parameters():
        moved = not torch.equal(p, before[name])
        assert moved == (p.ndim > 1), name


def test_a_gradient_scaler_steps_it_like_torch_optim() -> None:
    phase = PhaseParams(lr=0.01)
    updated = []
    for make in (
        lambda groups: make_optimizer(groups, phase),
        lambda groups: torch.optim.Adam([{"params": g} for g in groups], lr=phase.lr),
    ):
        net, groups = two_groups(seed=0)
        optimizer = make(groups)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        inputs, labels = torch.randn(8, 6), torch.randint(0, 3, (8,))
        for _ in range(3):
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(nn.functional.cross_entropy(net(inputs), labels)).backward()
            scaler.step(optimizer)
            scaler.update()
        updated.append(net[2].weight.detach().clone())
    assert torch.equal(updated[0], updated[1])


def test_training_a_head_does_not_import_torch_dynamo() -> None:
    code = (
        "import sys, torch\n"
        "from twophase.optim import make_optimizer\nfrom twophase.params import PhaseParams\n"
        "from test_optim import train, two_groups\n"
        "net, groups = two_groups(0)\n"
        "train(net, make_optimizer(groups, PhaseParams(lr=0.01)))\n"
        "assert 'torch._dynamo' not in sys.modules, 'torch._dynamo was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=__file__.rsplit("/", 1)[0])


@pytest.mark.parametrize(
    ("arch", "spared"),
    [
        ("convnext_tiny", {"layer_scale"}),
        ("vit_b_16", {"class_token", "pos_embedding"}),
        ("swin_t", {"relative_position_bias_table"}),
        ("timm/vit_tiny_patch16_224", {"cls_token", "pos_embed"}),
    ],
)
def test_weight_decay_spares_embeddings_and_layer_scales(arch: str, spared: set[str]) -> None:
    """Beyond the one-dimensional parameters: tokens, position tables and layer scales of two or
    more dimensions are no weights either (timm lists its own in `no_weight_decay()`)."""
    from twophase.model import create_model
    from twophase.optim import decay_exempt

    model = create_model(arch, {})
    exempt = decay_exempt(model)
    named = dict(model.named_parameters())
    multi = {n.rpartition(".")[2] for n, p in named.items() if id(p) in exempt and p.ndim > 1}
    assert multi == spared
    assert all(id(p) in exempt for p in named.values() if p.ndim <= 1)
    assert any(id(p) not in exempt for p in named.values())  # the weights are decayed
