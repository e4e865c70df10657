"""No stage spends longer starting than working (figures: bench/RESULTS.md).

Only what can be asserted without timing: stages that run no network never import torch;
evaluate draws nothing (matplotlib is the report's); the numpy metrics that replaced
scikit-learn's (a second of import) compute the same numbers; a checkpoint built on the meta
device holds exactly the saved tensors. (tests/test_optim.py: training imports no torch._dynamo.)
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from tests.helpers import PROJECT
from twophase import checkpoint as checkpoint_module
from twophase.metrics import confusion, score

STAGES_WITHOUT_A_NETWORK = ("validate", "download", "index", "split", "report")


@pytest.mark.parametrize("stage", STAGES_WITHOUT_A_NETWORK)
def test_stages_without_a_network_do_not_import_torch(stage: str) -> None:
    code = (
        "import sys; sys.path.insert(0, 'stages'); "
        f"import {stage}; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=PROJECT, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "[]", f"stages/{stage}.py imports {done.stdout.strip()}"


def test_the_twophase_command_starts_without_torch() -> None:
    """`twophase --help` and `twophase params` answer at once: each command imports torch (and
    `lr-find` the training modules) only when it runs."""
    code = (
        "import sys; from twophase import cli; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch' "
        "or m.startswith('twophase.lr_find')))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(PROJECT / "src")},
    )
    assert done.stdout.strip() == "[]", done.stdout


def test_evaluate_does_not_import_matplotlib() -> None:
    code = (
        "import sys; sys.path.insert(0, 'stages'); import evaluate; "
        "print('matplotlib' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=PROJECT, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "False"


def test_a_checkpoint_loads_its_own_tensors_without_initialising_new_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch.manual_seed(0)
    saved = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    saved[1].running_mean += 1.0
    checkpoint = {"state_dict": saved.state_dict()}
    monkeypatch.setattr(
        checkpoint_module,
        "build_network",
        lambda _: nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)),
    )
    loaded = checkpoint_module.network_of(checkpoint)
    for (name, mine), (_, expected) in zip(
        loaded.state_dict().items(), saved.state_dict().items(), strict=True
    ):
        assert mine.device.type == "cpu" and torch.equal(mine, expected), name


def test_loading_to_train_draws_from_the_rng_as_building_always_did(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def build(_: dict) -> nn.Module:
        return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))

    checkpoint = {"state_dict": build({}).state_dict()}
    monkeypatch.setattr(checkpoint_module, "build_network", build)
    draws = []
    for load in (
        lambda: checkpoint_module.network_of(checkpoint, initialise=True),
        lambda: build({}),
        lambda: checkpoint_module.network_of(checkpoint),
        lambda: None,
    ):
        torch.manual_seed(0)
        load()
        draws.append(torch.rand(1).item())
    assert draws[0] == draws[1], "phase 2 must start from the RNG state it always had"
    assert draws[2] == draws[3], "loading for inference leaves the RNG alone"
    assert draws[0] != draws[2]


class WithScratchBuffer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.register_buffer("scratch", torch.ones(3), persistent=False)


def test_a_buffer_the_checkpoint_does_not_hold_is_built_the_ordinary_way(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    saved = WithScratchBuffer()
    monkeypatch.setattr(checkpoint_module, "build_network", lambda _: WithScratchBuffer())
    loaded = checkpoint_module.network_of({"state_dict": saved.state_dict()})
    assert isinstance(loaded, WithScratchBuffer)
    assert torch.equal(loaded.scratch, torch.ones(3))
    assert torch.equal(loaded.linear.weight, saved.linear.weight)


def test_numpy_metrics_equal_scikit_learns() -> None:
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    rng = np.random.default_rng(0)
    names = [f"c{i}" for i in range(7)]
    labels = rng.integers(0, 6, size=300)  # class 6 never occurs: zero support
    predicted = np.where(rng.random(300) < 0.6, labels, rng.integers(0, 5, size=300))
    scores = score(labels, predicted, names)
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predicted, labels=list(range(7)), zero_division=0
    )
    assert scores["precision_macro"] == round(float(np.mean(precision)), 6)
    assert scores["recall_macro"] == round(float(np.mean(recall)), 6)
    assert scores["f1_macro"] == round(float(np.mean(f1)), 6)
    for row, p, r, f, s in zip(scores["per_class"], precision, recall, f1, support, strict=True):
        assert (row["precision"], row["recall"], row["f1"], row["support"]) == (
            round(float(p), 6),
            round(float(r), 6),
            round(float(f), 6),
            int(s),
        )
    expected = confusion_matrix(labels, predicted, labels=list(range(7)))
    assert np.array_equal(confusion(labels, predicted, 7), expected)
