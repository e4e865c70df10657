"""`twophase lr-find`: the LR finder's curve, its suggestion, and a workspace left as it was."""

from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests.test_phases import cached_imagefolder, tiny_params
from twophase import lr_find
from twophase.batches import array_batches
from twophase.cli import main
from twophase.model import build_head
from twophase.params import PhaseParams, to_dict
from twophase.phases import train_transfer

CPU = torch.device("cpu")


def test_valley_is_halfway_along_the_longest_fall_as_fastai_computes_it() -> None:
    # the longest decreasing run is 5 (index 2) ... 0.4 (index 8), 7 points; fastai starts it
    # one before (index 1) and takes 1 + int(7 / 3) + int(7 / 6) = 4
    losses = [5.0, 5.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.5, 0.4, 3.0, 10.0]
    lrs = [10.0**i for i in range(len(losses))]
    assert lr_find.valley(lrs, losses) == 1e4


def test_the_schedule_grows_exponentially_from_start_to_end() -> None:
    lrs = [lr_find.lr_schedule(i, 100, 1e-7, 10.0) for i in range(101)]
    assert lrs[0] == 1e-7 and lrs[100] == pytest.approx(10.0)
    assert lrs[50] == pytest.approx(math.sqrt(1e-7 * 10.0))
    ratios = np.diff(np.log(lrs))
    assert np.allclose(ratios, ratios[0])


def test_the_curve_falls_then_diverges_and_the_suggestion_lies_in_the_fall() -> None:
    """Four overlapping classes: no LR drives the loss to 0, so a large one blows it up."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=512)
    x = (rng.normal(size=(4, 16))[labels] + rng.normal(size=(512, 16))).astype(np.float32)
    torch.manual_seed(0)
    head = build_head(16, [32], 0.0, 4)
    curve = lr_find.sweep(
        head,
        array_batches(x, labels.astype(np.int64), 32, True, seed=0),
        PhaseParams(),  # Adam
        device=CPU,
        steps=100,
    )
    steps = len(curve.lrs)
    assert curve.diverged and steps < 100
    assert curve.lrs == [lr_find.lr_schedule(i, 100, 1e-7, 10.0) for i in range(steps)]
    average = 0.0  # fastai's debiased moving average, by hand
    for i, loss in enumerate(curve.losses):
        average = 0.98 * average + 0.02 * loss
        assert curve.smoothed[i] == pytest.approx(average / (1 - 0.98 ** (i + 1)), rel=1e-9)
    lowest = int(np.argmin(curve.smoothed))
    assert curve.smoothed[-1] > 4 * curve.smoothed[lowest], "stopped at 4x the lowest"
    assert curve.smoothed[lowest] < 0.6 * curve.smoothed[0], "the loss fell"
    flat = curve.smoothed[:10]
    assert max(flat) - min(flat) < 0.1 * flat[0], "little learning at 1e-7 ... 6e-7"
    chosen = curve.lrs.index(curve.suggestion)
    assert chosen < lowest
    assert curve.smoothed[lowest] < curve.smoothed[chosen] < curve.smoothed[0]
    assert curve.smoothed[chosen + 1] < curve.smoothed[chosen], "the loss falls there"


def _files(root: Path) -> dict[str, tuple[str, int]]:
    return {
        path.relative_to(root).as_posix(): (
            hashlib.sha256(path.read_bytes()).hexdigest(),
            path.stat().st_mtime_ns,
        )
        for path in root.rglob("*")
        if path.is_file()
    }


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workspace as `dvc repro train_transfer` leaves it: params.yaml, the feature cache,
    phase 1's checkpoint (built by the stage functions, without DVC)."""
    root = tmp_path_factory.mktemp("lr_find")
    params, split = cached_imagefolder(root)
    (root / "data").mkdir()
    for folder in ("embeddings", "activations"):
        (root / folder).rename(root / "data" / folder)
    split.to_csv(root / "data" / "split.csv", index=False)
    (root / "params.yaml").write_text(yaml.safe_dump(to_dict(params), sort_keys=False))
    train_transfer(
        params,
        root / "data" / "embeddings",
        root / "models" / "transfer.pt",
        root / "plots" / "train_transfer" / "history.csv",
    )
    return root


@pytest.mark.parametrize("phase", ["transfer", "finetune"])
def test_lr_find_writes_the_curve_and_nothing_else_and_is_seeded(
    project: Path,
    phase: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(project)
    curve = project / "plots" / "lr_find" / f"{phase}.csv"
    before = _files(project)
    written = []
    for _ in range(2):
        assert main(["lr-find", "--phase", phase, "--steps", "10"]) == 0
        first = capsys.readouterr().out.splitlines()[0]
        assert re.fullmatch(r"suggested lr: \d\.\d\de[-+]\d\d", first), first
        written.append(curve.read_bytes())
        after = _files(project)
        assert set(after) == {*before, curve.relative_to(project).as_posix()}
        assert {k: v for k, v in after.items() if k in before} == before
    assert written[0] == written[1], "the same params give the same curve"
    lines = written[0].decode().splitlines()
    assert lines[0] == "step,lr,log10_lr,loss,smoothed"
    assert 2 <= len(lines) - 1 <= 10
    suggested = float(first.split(": ")[1])
    lrs = [float(line.split(",")[1]) for line in lines[1:]]
    assert min(lrs) <= suggested <= max(lrs)


def test_a_missing_cache_or_checkpoint_is_one_line_naming_the_file_and_the_stage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(to_dict(tiny_params())))
    assert main(["lr-find", "--phase", "transfer"]) == 1
    error = capsys.readouterr().err.strip()
    assert error == (
        "twophase: error: data/embeddings/meta.json is missing: run `dvc repro features` first "
        "(lr-find reads the cache)"
    )
    activations = tmp_path / "data" / "activations"
    activations.mkdir(parents=True)
    for name in ("meta.json", "train_activations.npy", "train_labels.npy"):
        (activations / name).touch()
    assert main(["lr-find", "--phase", "finetune"]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("twophase: error: models/transfer.pt is missing: run `dvc repro ")
    assert "train_transfer` first" in error and "\n" not in error
    lbfgs = {**to_dict(tiny_params()), "model": {"dense_units": []}}
    lbfgs["train_transfer"]["solver"] = "lbfgs"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(lbfgs))
    assert main(["lr-find", "--phase", "transfer"]) == 1
    assert "train_transfer.solver is lbfgs, a linear probe" in capsys.readouterr().err
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "data",
        "data/activations",
        "data/activations/meta.json",
        "data/activations/train_activations.npy",
        "data/activations/train_labels.npy",
        "params.yaml",
    ], "a failed lr-find writes nothing"


def test_the_commands_defaults_are_the_finders() -> None:
    import argparse

    from twophase import cli

    seen: dict[str, argparse.Namespace] = {}

    def capture(args: argparse.Namespace) -> int:
        seen["args"] = args
        return 0

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cli, "_lr_find", capture)
        cli.main(["lr-find", "--phase", "transfer"])
    args = seen["args"]
    assert (args.steps, args.start_lr, args.end_lr) == (
        lr_find.STEPS,
        lr_find.START_LR,
        lr_find.END_LR,
    )
