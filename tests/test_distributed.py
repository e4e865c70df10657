"""Issue I: several processes (torchrun + DDP, gloo on this CPU) compute what one process does.

Two ranks must give bitwise the same feature cache and, with the same global batch and seed,
phase-1 and phase-2 losses within 1e-5 of one process. Dropout is off here: each rank draws the
dropout masks of its own slice, so with dropout the runs are equally valid but not equal.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.helpers import PROJECT, make_imagefolder
from twophase.datasets import build_index
from twophase.params import ComputeParams
from twophase.split import split_index
from twophase.stage import torchrun_command

WORKER = PROJECT / "tests" / "distributed_worker.py"
RAW = {
    "device": "cpu",
    "data": {"dataset": "imagefolder", "image_size": 32, "val_ratio": 0.25, "augment": []},
    "model": {"weights": "none", "dense_units": [16], "dropout": 0.0},
    "features": {"batch_size": 8, "num_workers": 0, "views": 0},
    # 18 training images in global batches of 7: slices of 4 and 3, then 2 and 2 per rank
    "train_transfer": {"lr": 0.01, "epochs": 4, "batch_size": 7},
    "finetune": {"lr": 0.001, "epochs": 2, "batch_size": 7},
}


def _run(split_csv: Path, out: Path, raw: dict, processes: int) -> None:
    compute = ComputeParams(nproc=processes)
    command = (
        torchrun_command(compute, str(WORKER)) if processes > 1 else [sys.executable, str(WORKER)]
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # torchrun's per-rank default, for both runs
    done = subprocess.run(
        [*command, str(split_csv), str(out), json.dumps(raw)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("distributed")
    make_imagefolder(root / "images", classes=("a", "b", "c"), train=8, test=3)
    split = split_index(build_index("imagefolder", root / "images"), 0.25, 42)
    split.to_csv(root / "split.csv", index=False)
    streamed = {**RAW, "finetune": {**RAW["finetune"], "input": "images"}}
    outs = {}
    for name, raw, processes in (
        ("one", RAW, 1),
        ("two", RAW, 2),
        ("one-streamed", streamed, 1),
        ("two-streamed", streamed, 2),
    ):
        _run(root / "split.csv", root / name, raw, processes)
        outs[name] = root / name
    return outs


def test_two_ranks_write_bitwise_the_same_feature_cache(runs: dict[str, Path]) -> None:
    one, two = runs["one"], runs["two"]
    names = sorted(p.relative_to(one).as_posix() for p in one.glob("*/*") if p.is_file())
    assert (
        "embeddings/train_embeddings.npy" in names and "activations/test_activations.npy" in names
    )
    assert names == sorted(p.relative_to(two).as_posix() for p in two.glob("*/*") if p.is_file())
    for name in names:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name


@pytest.mark.parametrize("phase2", ["cached", "streamed"])
def test_two_ranks_train_both_phases_as_one_process(runs: dict[str, Path], phase2: str) -> None:
    suffix = "" if phase2 == "cached" else "-streamed"
    for history in ("t.csv", "f.csv"):
        one = pd.read_csv(runs["one" + suffix] / history)
        two = pd.read_csv(runs["two" + suffix] / history)
        assert len(one) == len(two) > 1
        assert one["epoch"].tolist() == two["epoch"].tolist()
        for column in ("train_loss", "val_loss"):
            assert two[column].tolist() == pytest.approx(one[column].tolist(), abs=1e-5), history
        assert two["val_acc"].tolist() == one["val_acc"].tolist()


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
