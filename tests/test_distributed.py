"""Speed-only settings give the same results: the same small experiment under every setting
params.yaml calls speed-only (`compute.nproc`, `compute.num_workers`, `features.batch_size`,
`features.num_workers`) must give the same feature cache (bit for bit), histories, checkpoints
and test metrics (exactly, or within 1e-5 where only the order of float sums differs: DDP's
gradient all-reduce, global batch statistics).

Several processes run under torchrun with gloo on this CPU. The head has dropout (masks keyed by
seed, epoch, step and global row) and `finetune.batchnorm: train` is covered (global batch
statistics under DDP, with plain SGD in phase 2: see BATCHNORM), so neither hides behind a
switched-off feature. The weight EMA (`ema`), which every rank keeps for itself, is compared
the same way.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tests.helpers import PROJECT, make_imagefolder
from twophase.datasets import build_index
from twophase.params import ComputeParams, flatten
from twophase.split import split_index
from twophase.stage import torchrun_command

WORKER = PROJECT / "tests" / "distributed_worker.py"
RAW = {
    "device": "cpu",
    "data": {"dataset": "imagefolder", "image_size": 32, "val_ratio": 0.25, "augment": []},
    "model": {"weights": "none", "dense_units": [16], "dropout": 0.3},
    "features": {"batch_size": 8, "num_workers": 0, "views": 0},
    # 18 training images in global batches of 7: slices of 4 and 3, then 2 and 2 per rank
    "train_transfer": {"lr": 0.01, "epochs": 4, "batch_size": 7},
    "finetune": {"lr": 0.001, "epochs": 2, "batch_size": 7},
}


def _with(raw: dict, section: str, **values: object) -> dict:
    return {**raw, section: {**raw.get(section, {}), **values}}


# streamed phase 2, and test-time augmentation's cache of the mirrored val and test images
STREAMED = _with(_with(RAW, "finetune", input="images"), "evaluate", tta="flip")
# Plain SGD: Adam divides each step by the gradient's own size, so under batch statistics of a
# few rows a gradient that is rounding noise moves its weight by up to lr, and two thread counts
# of one process (OMP_NUM_THREADS 1 and 2) end phase 2 3e-4 apart in val_loss: the pair would
# measure that amplification, not the global statistics (Adam is the other runs'). Measured with
# SGD, 1 and 2 ranks agree to 1e-6 at lr 0.02 and drift 1e-4 apart at 0.05; at 0.02 phase 2's
# best epoch is a trained one, so its checkpoint holds moved statistics.
BATCHNORM = _with(RAW, "finetune", batchnorm="train", optimizer="sgd", momentum=0.0, lr=0.02)
EMA = _with(_with(RAW, "train_transfer", ema=0.5), "finetune", ema=0.5)
# name: (params, processes, the run it must equal)
MATRIX = {
    "one": (RAW, 1, None),
    "nproc-2": (RAW, 2, "one"),
    "compute-workers-2": (_with(RAW, "compute", num_workers=2), 1, "one"),
    "features-batch-5": (_with(RAW, "features", batch_size=5), 1, "one"),
    "features-workers-2": (_with(RAW, "features", num_workers=2), 1, "one"),
    "streamed": (STREAMED, 1, None),
    "streamed-nproc-2": (STREAMED, 2, "streamed"),
    "batchnorm-train": (BATCHNORM, 1, None),
    "batchnorm-train-nproc-2": (BATCHNORM, 2, "batchnorm-train"),
    "ema": (EMA, 1, None),
    "ema-nproc-2": (EMA, 2, "ema"),
}
PAIRS = [(name, same_as) for name, (_, _, same_as) in MATRIX.items() if same_as]


def _run(split_csv: Path, runs: list[tuple[str, dict]], processes: int) -> None:
    compute = ComputeParams(nproc=processes)
    command = (
        torchrun_command(compute, str(WORKER)) if processes > 1 else [sys.executable, str(WORKER)]
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # torchrun's per-rank default, for both runs
    done = subprocess.run(
        [*command, str(split_csv), json.dumps(runs)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("distributed")
    make_imagefolder(root / "images", classes=("a", "b", "c"), train=8, test=3)
    split = split_index(build_index("imagefolder", root / "images"), 0.25, 42)
    split.to_csv(root / "split.csv", index=False)
    for processes in (1, 2):  # one process (or one torchrun) runs its variants one by one
        variants = [
            (str(root / name), raw) for name, (raw, n, _) in MATRIX.items() if n == processes
        ]
        _run(root / "split.csv", variants, processes)
    return {name: root / name for name in MATRIX}


def _cache_files(run: Path) -> list[str]:
    files = [*run.glob("*ings/*"), *run.glob("activations/*"), *run.glob("tta/*")]
    return sorted(p.relative_to(run).as_posix() for p in files if p.is_file())


# The trunk's convolutions pick their kernels by batch size, which sums in another order: the
# cached floats of another features.batch_size agree to float rounding, not bit for bit.
ROUNDING_ONLY = {"features-batch-5"}


@pytest.mark.parametrize(("name", "same_as"), PAIRS, ids=[name for name, _ in PAIRS])
def test_a_speed_setting_writes_the_same_feature_cache(
    runs: dict[str, Path], name: str, same_as: str
) -> None:
    one, other = runs[same_as], runs[name]
    names = _cache_files(one)
    assert "embeddings/train_embeddings.npy" in names
    assert names == _cache_files(other)
    for file in names:
        a, b = (one / file).read_bytes(), (other / file).read_bytes()
        if name in ROUNDING_ONLY and file.endswith(".npy"):
            x, y = np.load(one / file), np.load(other / file)
            assert x.dtype == y.dtype and x.shape == y.shape, file
            np.testing.assert_allclose(y, x, atol=1e-5, rtol=1e-5, err_msg=file)
        else:
            assert a == b, file


@pytest.mark.parametrize(("name", "same_as"), PAIRS, ids=[name for name, _ in PAIRS])
def test_a_speed_setting_trains_and_scores_the_same_network(
    runs: dict[str, Path], name: str, same_as: str
) -> None:
    one, other = runs[same_as], runs[name]
    for history in ("t.csv", "f.csv"):
        a, b = pd.read_csv(one / history), pd.read_csv(other / history)
        assert len(a) == len(b) > 1
        assert a["epoch"].tolist() == b["epoch"].tolist()
        for column in ("train_loss", "val_loss", "train_acc"):
            assert b[column].tolist() == pytest.approx(a[column].tolist(), abs=1e-5), history
        assert b["val_acc"].tolist() == a["val_acc"].tolist()
    for checkpoint in ("t.pt", "f.pt"):
        a, b = (torch.load(run / checkpoint, weights_only=True) for run in (one, other))
        assert a["best_epoch"] == b["best_epoch"], checkpoint
        phase = MATRIX[name][0]["train_transfer" if checkpoint == "t.pt" else "finetune"]
        if phase.get("optimizer", "adam") == "sgd":  # a step linear in the gradient: no slack
            _assert_same_weights(b["state_dict"], a["state_dict"], 1e-5, checkpoint, share=0)
        else:
            _assert_same_weights(b["state_dict"], a["state_dict"], phase["lr"], checkpoint)
    a, b = (flatten(json.loads((run / "evaluate.json").read_text())) for run in (one, other))
    assert b == pytest.approx(a, abs=1e-5)


def _assert_same_weights(
    other: dict[str, torch.Tensor],
    weights: dict[str, torch.Tensor],
    bound: float,
    what: str,
    share: float = 1e-4,
) -> None:
    """Equal to float rounding, as Adam lets it show: no weight `bound` (one step, lr) apart or
    more, and all but `share` of them within 1e-5. Adam divides each step by the root of the
    squared gradients, so where a gradient is almost 0 (a unit the batch barely used) a rounding
    difference in it becomes a step of up to `lr`: a few dozen of the 11 million weights end up
    more than 1e-5 apart. SGD's checkpoints are held to `share=0`."""
    assert other.keys() == weights.keys(), what
    count = beyond = 0
    for key, value in weights.items():
        if not value.is_floating_point():
            assert torch.equal(other[key], value), f"{what} {key}"
            continue
        difference = (other[key] - value).abs()
        assert difference.max().item() < bound, f"{what} {key}"
        count, beyond = count + value.numel(), beyond + int((difference > 1e-5).sum())
    assert beyond <= share * count, (what, beyond, count)


def test_the_matrix_exercises_dropout_and_batch_statistics(runs: dict[str, Path]) -> None:
    """The matrix proves something only if training draws masks: the runs' dropout is on, the
    batchnorm: train run's phase 2 moves layer4's running statistics (frozen, they stay; its
    nproc-2 twin compares the global statistics' updates with them), and the EMA changes both
    phases' val losses (so they are exercised)."""
    for run, moved in (("one", False), ("batchnorm-train", True)):  # layer4's statistics
        before, after = (torch.load(runs[run] / c, weights_only=True) for c in ("t.pt", "f.pt"))
        assert before["head"]["dropout"] == 0.3, run
        keys = [k for k in after["state_dict"] if k.startswith("layer4.") and "running_" in k]
        assert keys, run
        same = [torch.equal(before["state_dict"][k], after["state_dict"][k]) for k in keys]
        assert not any(same) if moved else all(same), run
    for history in ("t.csv", "f.csv"):  # every rank validates the same weight EMA
        plain = pd.read_csv(runs["one"] / history)["val_loss"].tolist()
        averaged = pd.read_csv(runs["ema"] / history)["val_loss"].tolist()
        assert averaged[1:] != pytest.approx(plain[1:], abs=1e-5), history


def test_the_torchrun_command_for_one_node_and_for_a_slurm_allocation() -> None:
    one_node = torchrun_command(ComputeParams(nproc=4), "stages/features.py")
    assert one_node[1:] == [
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=4",
        "stages/features.py",
    ]
    slurm = ComputeParams(
        nproc=8,
        nnodes=2,
        rdzv_endpoint="node01:29400",
        launcher="srun --nodes=2 --ntasks-per-node=1",
    )
    command = torchrun_command(slurm, "stages/finetune.py")
    assert command[:4] == ["srun", "--nodes=2", "--ntasks-per-node=1", sys.executable]
    assert "--nnodes=2" in command and "--nproc-per-node=8" in command
    assert "--rdzv-endpoint=node01:29400" in command and command[-1] == "stages/finetune.py"


def test_several_nodes_need_the_first_nodes_address() -> None:
    from twophase.params import ParamsError

    with pytest.raises(ParamsError, match=r"compute\.rdzv_endpoint: '' .*host:port"):
        ComputeParams(nnodes=2)
