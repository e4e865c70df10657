"""Optimizers, schedules, discriminative LRs and the linear probe, by mechanism."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from tests.helpers import PROJECT
from tests.test_train import separable_embeddings, tiny_network
from twophase.batches import array_batches
from twophase.mixing import Mixing
from twophase.model import build_head
from twophase.network import discriminative_groups
from twophase.optim import lr_factor
from twophase.params import PhaseParams
from twophase.train import fit, fit_linear_probe, run_epoch

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("schedule", "warmup", "expected"),
    [
        ("constant", 0, [1, 1, 1, 1]),
        ("constant", 2, [1 / 3, 2 / 3, 1, 1]),
        ("cosine", 0, [1, 0.853553, 0.5, 0.146447]),
        ("cosine", 1, [0.5, 1, 0.75, 0.25]),
    ],
)
def test_lr_factor_follows_the_schedule(schedule: str, warmup: int, expected: list[float]) -> None:
    assert [round(lr_factor(e, 4, schedule, warmup), 6) for e in range(4)] == pytest.approx(
        expected, abs=1e-6
    )


def test_onecycle_rises_then_anneals_to_almost_nothing() -> None:
    factors = [lr_factor(e, 10, "onecycle") for e in range(10)]
    peak = int(np.argmax(factors))
    assert factors[0] == pytest.approx(1 / 25) and peak == 3 and factors[peak] == 1
    assert all(a > b for a, b in zip(factors[peak:], factors[peak + 1 :], strict=False))
    assert factors[-1] < 0.05


@pytest.mark.parametrize(("epochs", "warmup"), [(3, 0), (4, 0), (15, 0), (15, 13), (50, 5)])
def test_onecycle_reaches_its_annealed_end_in_the_last_epoch(epochs: int, warmup: int) -> None:
    """Read off the history's LR column, as a user sees it in `dvc plots show`."""
    torch.manual_seed(0)
    x, y = separable_embeddings(32)
    result = fit(
        build_head(8, [], 0.0, 3),
        (array_batches(x, y, 32, True), array_batches(x, y, 32)),
        PhaseParams(
            lr=0.01, schedule="onecycle", warmup_epochs=warmup, epochs=epochs, patience=epochs
        ),
        device=CPU,
    )
    lrs = [row.lr for row in result.history]
    assert len(lrs) == epochs
    assert lrs[0] == pytest.approx(0.01 / 25) and max(lrs) == pytest.approx(0.01)
    assert lrs[-1] == pytest.approx(0.01 / 1e4)


@pytest.mark.parametrize(("epochs", "warmup"), [(1, 0), (2, 0), (5, 4)])
def test_onecycle_too_short_to_peak_and_anneal_is_a_params_error(epochs: int, warmup: int) -> None:
    from twophase.params import ParamsError, parse_params

    raw = {"train_transfer": {"schedule": "onecycle", "epochs": epochs, "warmup_epochs": warmup}}
    with pytest.raises(ParamsError, match=r"^train_transfer\.(epochs|warmup_epochs): "):
        parse_params(raw)


def test_the_history_records_each_epochs_lr() -> None:
    torch.manual_seed(0)
    x, y = separable_embeddings(64)
    result = fit(
        build_head(8, [16], 0.0, 3),
        (array_batches(x, y, 16, True), array_batches(x, y, 64)),
        PhaseParams(
            lr=0.01, optimizer="adamw", weight_decay=0.01, schedule="cosine", epochs=4, patience=10
        ),
        device=CPU,
    )
    assert [round(row.lr, 6) for row in result.history] == [0.01, 0.008536, 0.005, 0.001464]


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
def test_each_optimizer_trains(optimizer: str) -> None:
    torch.manual_seed(0)
    x, y = separable_embeddings(96)
    head = build_head(8, [16], 0.0, 3)
    before, _ = run_epoch(head, array_batches(x, y, 96), CPU)
    phase = PhaseParams(
        lr=0.05, optimizer=optimizer, nesterov=optimizer == "sgd", weight_decay=1e-4, epochs=5
    )
    result = fit(
        head,
        (array_batches(x, y, 16, True), array_batches(x, y, 96)),
        phase,
        device=CPU,
        desc=optimizer,
    )
    assert result.best_val_loss < before


LOSS_SETTINGS = {
    "label_smoothing": ({"label_smoothing": 0.2}, {}),
    "class_weights": ({}, {"class_weights": torch.tensor([3.0, 1.0, 0.2])}),
    "mixup": ({}, {"mixing": Mixing(mixup=0.4)}),
}


@pytest.mark.parametrize("setting", list(LOSS_SETTINGS))
def test_a_loss_setting_changes_the_training_loss_not_the_validation_loss(setting: str) -> None:
    x, y = separable_embeddings(64)
    runs = []
    for phase_values, fit_values in (({}, {}), LOSS_SETTINGS[setting]):
        torch.manual_seed(0)
        head = build_head(8, [16], 0.0, 3)
        phase = PhaseParams(lr=1e-9, epochs=1, patience=1, **phase_values)
        batches = (array_batches(x, y, 64), array_batches(x, y, 64))
        runs.append(fit(head, batches, phase, device=CPU, **fit_values))
    plain, changed = runs[0].history[0], runs[1].history[0]
    assert changed.train_loss != pytest.approx(plain.train_loss, abs=1e-4)
    assert changed.val_loss == pytest.approx(plain.val_loss, abs=1e-6)


def test_discriminative_lrs_give_earlier_blocks_smaller_lrs() -> None:
    tail = tiny_network(first="layer3")
    groups, scales = discriminative_groups(tail, ["layer1", "layer2", "layer3", "layer4"], 0.5)
    assert scales == [1.0, 0.5, 0.25]
    layer4 = {id(p) for p in tail.model.layer4.parameters()}
    layer3 = {id(p) for p in tail.model.layer3.parameters()}
    head = {id(p) for p in tail.model.fc.parameters()}
    assert {id(p) for p in groups[1]} == layer4 and {id(p) for p in groups[2]} == layer3
    assert {id(p) for p in groups[0]} == head
    one, same = discriminative_groups(tail, ["layer1", "layer2", "layer3", "layer4"], 1.0)
    assert same == [1.0] and len(one[0]) == sum(len(g) for g in groups)


def test_with_every_block_unfrozen_the_stem_gets_the_smallest_lr() -> None:
    tail = tiny_network(first=None)
    blocks = ["layer1", "layer2", "layer3", "layer4"]
    groups, scales = discriminative_groups(tail, blocks, 0.5)
    assert scales == [1.0, 0.5, 0.25, 0.125, 0.0625, 0.03125]
    model = tail.model
    assert {id(p) for p in groups[0]} == {id(p) for p in model.fc.parameters()}
    assert {id(p) for p in groups[4]} == {id(p) for p in model.layer1.parameters()}
    stem = [*model.conv1.parameters(), *model.bn1.parameters()]
    assert {id(p) for p in groups[5]} == {id(p) for p in stem}
    assert sum(len(g) for g in groups) == len(list(model.parameters()))


def test_linear_probe_beats_or_matches_adam_on_the_same_embeddings() -> None:
    every, labels = separable_embeddings(180, dim=16, seed=3)
    x, y, vx, vy = every[:120], labels[:120], every[120:], labels[120:]
    torch.manual_seed(0)
    adam = fit(
        build_head(16, [], 0.0, 3),
        (array_batches(x, y, 32, True), array_batches(vx, vy, 60)),
        PhaseParams(lr=1e-3, epochs=30, patience=30),
        device=CPU,
    )
    probe = fit_linear_probe(build_head(16, [], 0.0, 3), (x, y), (vx, vy), CPU)
    assert probe.l2 is not None and probe.best_val_loss <= adam.best_val_loss
    assert isinstance(build_head(16, [], 0.0, 3)[0], nn.Linear)


@pytest.mark.parametrize("recipe", sorted(p.stem for p in (PROJECT / "recipes").glob("*.yaml")))
def test_every_recipe_is_valid_params(recipe: str) -> None:
    import yaml

    from scripts.recipe import recipe_args
    from twophase.params import Params, parse_params, read_yaml, to_dict

    path = PROJECT / "recipes" / f"{recipe}.yaml"
    assert yaml.safe_load(path.read_text())["purpose"].strip()
    args = recipe_args(path)
    raw = to_dict(Params())
    for key, value in (arg.split("=", 1) for arg in args[1::2]):
        section, name = key.split(".")
        raw[section][name] = read_yaml(value)
    parse_params(raw)  # every key exists and every value is allowed
