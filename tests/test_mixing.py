"""MixUp and CutMix: mixed inputs, soft targets and their loss against formulas computed by hand
on tiny tensors, the box against timm's, and the draws keyed by (seed, epoch, step)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from twophase.mixing import Mix, Mixing, box_area, cutmix_box
from twophase.train import run_epoch, training_loss

CPU = torch.device("cpu")


def hand_targets(
    labels: list[int], perm: list[int], lam: float, classes: int, eps: float
) -> list[list[float]]:
    """Each row's one-hot smoothed ((1 - eps) onehot + eps / C), then mixed with its partner's."""

    def smoothed(label: int) -> list[float]:
        return [(1 - eps) * (c == label) + eps / classes for c in range(classes)]

    return [
        [lam * a + (1 - lam) * b for a, b in zip(smoothed(y), smoothed(labels[p]), strict=True)]
        for y, p in zip(labels, perm, strict=True)
    ]


def hand_loss(
    logits: list[list[float]],
    labels: list[int],
    targets: list[list[float]],
    weights: list[float] | None,
) -> float:
    """sum_i sum_c w_c t_ic (-log softmax_ic) / sum_i w_(y_i), in float64."""
    w = weights or [1.0] * len(logits[0])
    total = 0.0
    for row, target in zip(logits, targets, strict=True):
        log_norm = math.log(sum(math.exp(v) for v in row))
        total += sum(w[c] * target[c] * (log_norm - row[c]) for c in range(len(row)))
    return total / sum(w[y] for y in labels)


LOGITS = [[1.0, -0.5, 0.25], [0.3, 2.0, -1.0], [-0.7, 0.1, 0.9], [0.0, 0.4, -0.2]]
LABELS = [0, 2, 2, 1]
PERM = [2, 0, 3, 1]


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_mixed_targets_sum_to_one_and_smooth_each_one_hot_before_mixing(eps: float) -> None:
    from timm.data.mixup import mixup_target

    labels = torch.tensor(LABELS)
    mix = Mix(0.3, torch.tensor(PERM))
    targets = mix.targets(labels, 3, eps)
    assert torch.allclose(targets.sum(dim=1), torch.ones(4), atol=1e-6)
    expected = torch.tensor(hand_targets(LABELS, PERM, 0.3, 3, eps))
    assert torch.allclose(targets, expected, atol=1e-6)
    # timm's formula, whose partner is the reversed batch
    reverse = Mix(0.3, torch.tensor([3, 2, 1, 0]))
    timm = mixup_target(labels, 3, lam=0.3, smoothing=eps)
    assert torch.allclose(reverse.targets(labels, 3, eps), timm, atol=1e-6)


def test_mixup_blends_each_input_with_its_partner() -> None:
    x = torch.arange(8.0).view(4, 2)
    mixed = Mix(0.3, torch.tensor(PERM)).inputs(x)
    for i, p in enumerate(PERM):
        for j in range(2):
            assert mixed[i, j].item() == pytest.approx(0.3 * x[i, j].item() + 0.7 * x[p, j].item())
    assert torch.equal(x, torch.arange(8.0).view(4, 2)), "the batch itself is left as it was"


@pytest.mark.parametrize("weights", [None, [1.0, 2.0, 4.0]])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_the_mixed_loss_is_the_soft_target_cross_entropy_by_hand(
    weights: list[float] | None, eps: float
) -> None:
    mix = Mix(0.3, torch.tensor(PERM))
    w = None if weights is None else torch.tensor(weights)
    got = training_loss(torch.tensor(LOGITS), torch.tensor(LABELS), eps, w, mix)
    targets = hand_targets(LABELS, PERM, 0.3, 3, eps)
    assert got.item() == pytest.approx(hand_loss(LOGITS, LABELS, targets, weights), rel=1e-6)
    # unmixed (lam 1, every row its own partner) it is torch's own weighted, smoothed loss
    own = Mix(1.0, torch.arange(4))
    unmixed = training_loss(torch.tensor(LOGITS), torch.tensor(LABELS), eps, w, own)
    torch_loss = nn.functional.cross_entropy(
        torch.tensor(LOGITS), torch.tensor(LABELS), weight=w, label_smoothing=eps
    )
    assert unmixed.item() == pytest.approx(torch_loss.item(), rel=1e-6)


def test_cutmix_box_is_timms() -> None:
    from timm.data.mixup import rand_bbox

    for seed in range(40):
        lam = float(np.random.default_rng(seed).uniform())
        height, width = 7 + seed % 5, 12 - seed % 4
        np.random.seed(seed)
        theirs = rand_bbox((3, height, width), lam)
        np.random.seed(seed)  # the centre timm drew
        centre = int(np.random.randint(0, height)), int(np.random.randint(0, width))
        assert cutmix_box(lam, height, width, *centre) == tuple(int(v) for v in theirs)


def test_cutmix_pastes_the_partners_box_and_lam_is_the_share_outside_it() -> None:
    x = torch.randn(5, 3, 16, 12)
    for step in range(20):
        mix = Mixing(cutmix=1.0).draw(5, (3, 16, 12), seed=1, epoch=2, step=step)
        assert mix.box is not None
        top, bottom, left, right = mix.box
        assert 0 <= top <= bottom <= 16 and 0 <= left <= right <= 12
        assert mix.lam == pytest.approx(1 - (bottom - top) * (right - left) / (16 * 12))
        mixed = mix.inputs(x)
        inside = torch.zeros(16, 12, dtype=torch.bool)
        inside[top:bottom, left:right] = True
        for i, p in enumerate(mix.perm.tolist()):
            assert torch.equal(mixed[i][:, inside], x[p][:, inside])
            assert torch.equal(mixed[i][:, ~inside], x[i][:, ~inside])
    with pytest.raises(ValueError, match="CutMix pastes boxes of images"):
        Mixing(cutmix=1.0).draw(5, (512,), seed=1, epoch=2, step=0)


def test_cutmix_box_holds_one_minus_lam_of_the_image_before_clipping() -> None:
    # a centre far from the borders: nothing clipped, the box is sqrt(1 - lam) of each side
    assert cutmix_box(0.75, 20, 40, 10, 20) == (5, 15, 10, 30)
    assert box_area(cutmix_box(0.75, 20, 40, 10, 20)) == 0.25 * 20 * 40
    assert cutmix_box(0.75, 20, 40, 0, 39) == (0, 5, 29, 40)  # clipped at the corner


def test_draws_are_keyed_by_seed_epoch_and_step_and_lam_is_every_ranks() -> None:
    torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()
    mixing = Mixing(mixup=0.4)
    first = mixing.draw(6, (8,), seed=3, epoch=1, step=4)
    again = mixing.draw(6, (8,), seed=3, epoch=1, step=4)
    assert first.lam == again.lam and torch.equal(first.perm, again.perm)
    assert sorted(first.perm.tolist()) == list(range(6))
    other_rank = mixing.draw(5, (8,), seed=3, epoch=1, step=4, rank=1)
    assert other_rank.lam == first.lam, "every rank mixes its slice by the same lam"
    assert sorted(other_rank.perm.tolist()) == list(range(5))
    lams = {mixing.draw(6, (8,), seed, epoch, step).lam for seed, epoch, step in
            [(3, 1, 5), (3, 2, 4), (4, 1, 4), (3, 1, 4)]}  # fmt: skip
    assert len(lams) == 4
    # nothing else's random numbers moved
    assert torch.equal(torch.get_rng_state(), torch_state)
    after = np.random.get_state()
    assert np.array_equal(after[1], numpy_state[1]) and after[2:] == numpy_state[2:]


def test_both_alphas_cut_or_mix_each_batch_at_even_odds() -> None:
    mixing = Mixing(mixup=0.2, cutmix=1.0)
    cut = [mixing.draw(4, (3, 8, 8), 0, 1, step).box is not None for step in range(400)]
    assert 0.4 < sum(cut) / len(cut) < 0.6


def test_training_accuracy_counts_each_prediction_against_its_targets_larger_share() -> None:
    """The inputs are the labels' one-hots and the model passes them through: mixed, each
    input's argmax is the label with the larger share of its target."""
    classes, rows = 4, 32
    labels = torch.arange(rows) % classes
    inputs = nn.functional.one_hot(labels, classes).float()
    model = nn.Linear(classes, classes)
    with torch.no_grad():
        model.weight.copy_(torch.eye(classes))
        model.bias.zero_()

    class Still:  # an optimizer that takes no step
        def zero_grad(self, set_to_none: bool = True) -> None:
            model.zero_grad(set_to_none=set_to_none)

        def step(self) -> None:
            pass

    batches = [(inputs[:16], labels[:16]), (inputs[16:], labels[16:])]
    mixing = Mixing(mixup=1.0)
    _, accuracy = run_epoch(model, batches, CPU, optimizer=Still(), mixing=mixing, seed=5, epoch=3)
    assert accuracy == 1.0
    # counted against the rows' own labels, some predictions would be wrong
    mixes = [mixing.draw(16, (classes,), 5, 3, step) for step in range(2)]
    assert any(
        m.lam < 0.5 and bool((own[m.perm] != own).any())
        for m, (_, own) in zip(mixes, batches, strict=True)
    )


def test_run_epoch_steps_on_the_mixed_weighted_smoothed_loss_of_its_step() -> None:
    """run_epoch draws the mix of (seed, epoch, step) and steps on its soft-target loss."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    twin = copy.deepcopy(model)
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 2, 0, 2])
    weights = torch.tensor([1.5, 0.5, 2.0])
    grads: list[torch.Tensor] = []

    class Capture:
        def zero_grad(self, set_to_none: bool = True) -> None:
            model.zero_grad(set_to_none=set_to_none)

        def step(self) -> None:
            grads.extend(p.grad.clone() for p in model.parameters())

    loss, _ = run_epoch(
        model,
        [(x, y)],
        CPU,
        optimizer=Capture(),
        label_smoothing=0.1,
        seed=9,
        epoch=2,
        class_weights=weights,
        mixing=Mixing(mixup=0.4),
    )
    mix = Mixing(mixup=0.4).draw(6, (4,), 9, 2, 0)
    assert 0 < mix.lam < 1 and not torch.equal(mix.perm, torch.arange(6))
    logits = twin(x * mix.lam + x[mix.perm] * (1 - mix.lam))
    targets = hand_targets(y.tolist(), mix.perm.tolist(), mix.lam, 3, 0.1)
    expected = hand_loss(logits.tolist(), y.tolist(), targets, weights.tolist())
    assert loss == pytest.approx(expected, rel=1e-6)
    training_loss(logits, y, 0.1, weights, mix).backward()
    for got, want in zip(grads, [p.grad for p in twin.parameters()], strict=True):
        assert torch.allclose(got, want, atol=1e-7)
