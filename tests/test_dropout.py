"""Keyed dropout: masks drawn from (seed, epoch, step, layer call, global row), not from an RNG."""

from __future__ import annotations

import pytest
import torch

from tests.test_train import separable_embeddings
from twophase.batches import array_batches
from twophase.dropout import KeyedDropout, KeyedDropPath, keyed, keyed_dropouts
from twophase.model import build_head, create_model
from twophase.params import PhaseParams
from twophase.train import fit

CPU = torch.device("cpu")


def test_dropout_keeps_one_minus_p_and_scales_what_it_keeps() -> None:
    layer = KeyedDropout(0.3).train()
    x = torch.ones(400, 250)
    with keyed(seed=1, epoch=2, step=3):
        y = layer(x)
    kept = y != 0
    assert 0.69 < kept.float().mean().item() < 0.71
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / 0.7))


def test_a_rank_draws_its_slice_of_the_global_batchs_masks() -> None:
    layer = KeyedDropout(0.5).train()
    x = torch.ones(10, 64)
    with keyed(42, 5, 7, offset=0):
        whole = layer(x)
    with keyed(42, 5, 7, offset=4):  # the second rank's rows 4..9
        part = layer(x[4:])
    assert torch.equal(whole[4:], part)


def test_masks_differ_between_epochs_steps_seeds_and_layers_and_repeat_for_the_same_key() -> None:
    layer = KeyedDropout(0.5).train()
    x = torch.ones(32, 32)

    def mask(seed: int, epoch: int, step: int, calls: int = 1) -> torch.Tensor:
        with keyed(seed, epoch, step):
            for _ in range(calls):
                out = layer(x)
        return out

    first = mask(0, 1, 1)
    assert torch.equal(first, mask(0, 1, 1))
    for other in (mask(1, 1, 1), mask(0, 2, 1), mask(0, 1, 2), mask(0, 1, 1, calls=2)):
        assert not torch.equal(first, other)
        assert 0.4 < (first == other).float().mean().item() < 0.6  # independent, not shifted


def test_stochastic_depth_drops_whole_rows_or_the_whole_batch() -> None:
    x = torch.ones(200, 3, 4, 4)
    with keyed(0, 1, 1):
        rows = KeyedDropPath(0.25, "row").train()(x)
    per_row = rows.flatten(1)
    assert torch.equal(per_row.min(1).values, per_row.max(1).values)  # one draw per row
    assert 0.65 < (per_row[:, 0] > 0).float().mean().item() < 0.85
    assert all(v == 0 or v == pytest.approx(1 / 0.75) for v in per_row[:, 0].tolist())
    batch = KeyedDropPath(0.5, "batch").train()
    outs = set()
    for step in range(20):
        for offset in (0, 7):  # every rank draws the one value of the global batch
            with keyed(0, 1, step, offset):
                value = batch(x[:5])
            assert value.unique().numel() == 1
            outs.add((step, float(value.flatten()[0])))
    assert len({v for _, v in outs}) == 2 and len(outs) == 20


def test_outside_a_keyed_step_they_drop_out_as_torch_does() -> None:
    torch.manual_seed(0)
    y = KeyedDropout(0.5).train()(torch.ones(1000))
    assert 0.4 < (y == 0).float().mean().item() < 0.6
    assert torch.equal(KeyedDropout(0.5).eval()(torch.ones(8)), torch.ones(8))


@pytest.mark.parametrize(
    ("arch", "kwargs", "kind"),
    [
        ("convnext_tiny", {"stochastic_depth_prob": 0.1}, "StochasticDepth"),
        ("efficientnet_b0", {}, "StochasticDepth"),
        ("timm/convnext_atto", {"drop_path_rate": 0.1, "drop_rate": 0.2}, "DropPath"),
    ],
)
def test_every_dropout_layer_of_a_backbone_becomes_keyed(
    arch: str, kwargs: dict, kind: str
) -> None:
    model = create_model(arch, kwargs)
    keys = list(model.state_dict())
    before = sum(type(m).__name__ == kind for m in model.modules())
    assert before > 0
    keyed_dropouts(model)
    names = [type(m).__name__ for m in model.modules()]
    assert kind not in names and "Dropout" not in names
    assert names.count("KeyedDropPath") == before
    assert list(model.state_dict()) == keys


def test_the_heads_dropout_changes_training() -> None:
    """Training with dropout 0.3 takes another path than without: the masks are applied."""
    histories = []
    for dropout in (0.0, 0.3):
        torch.manual_seed(0)
        x, y = separable_embeddings(64)
        result = fit(
            build_head(8, [32], dropout, 3),
            (array_batches(x, y, 16, True), array_batches(x, y, 64)),
            PhaseParams(lr=0.01, epochs=3, patience=5),
            device=CPU,
        )
        histories.append([row.train_loss for row in result.history])
    assert histories[0] != pytest.approx(histories[1], abs=1e-4)
