"""Benchmark: twophase's DVC pipeline against the notebook's algorithm and the compute floors.

In one run, on the same synthetic ImageFolder and machine, it times
  (a) the notebook's algorithm (bench/notebook.py): whole ResNet18 over every image, every epoch;
  (b) twophase's `dvc repro`, stage by stage, with the same epochs and batch size (patience
      above the epoch count, so both run every epoch), then `dvc exp run -S train_transfer.lr=...`
      and `dvc exp run -S finetune.lr=...` after it;
  (c) the floors: one forward pass of the frozen trunk over every image (decoding included), and
      one epoch of forward+backward through only the unfrozen blocks + head;
and prints wall times and ratios (also written as JSON with --json).

    python bench/run.py                   # defaults: 400 images, 224 px, 50 + 15 epochs
    python bench/run.py --quick           # a smoke run in about a minute
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

BENCH = Path(__file__).resolve().parent
PROJECT = BENCH.parent
sys.path.insert(0, str(PROJECT / "src"))
sys.path.insert(0, str(BENCH))

from notebook import run_notebook  # noqa: E402
from synth import make_imagefolder  # noqa: E402

STAGES = tuple(yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"])  # DAG order


def copy_project(target: Path) -> None:
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=PROJECT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    for name in files:
        if (PROJECT / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(PROJECT / name, target / name)


def sh(repo: Path, *args: str) -> float:
    env = {
        **os.environ,
        "DVC_NO_ANALYTICS": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    start = time.perf_counter()
    done = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{(done.stdout + done.stderr)[-3000:]}")
    return seconds


def twophase_project(workdir: Path, data: Path, args: argparse.Namespace) -> Path:
    repo = workdir / "project"
    if repo.exists():
        shutil.rmtree(repo)
    repo.mkdir(parents=True)
    copy_project(repo)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"].update(dataset="imagefolder", root=str(data), image_size=args.image_size)
    params["model"]["weights"] = "none"  # no network here; weights do not change timing
    params["features"]["num_workers"] = args.workers
    for section, epochs in (
        ("train_transfer", args.transfer_epochs),
        ("finetune", args.finetune_epochs),
    ):
        params[section].update(epochs=epochs, patience=epochs + 1, batch_size=args.batch_size)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for command in (
        ["git", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-qm", "b"],
    ):
        sh(repo, *command)
    return repo


def time_twophase(repo: Path) -> dict[str, float]:
    times = {stage: sh(repo, "dvc", "repro", "--single-item", stage) for stage in STAGES}
    for command in (
        ["git", "add", "-A"],
        ["git", "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-qm", "r"],
    ):
        sh(repo, *command)
    times["exp_run_transfer_lr"] = sh(repo, "dvc", "exp", "run", "-S", "train_transfer.lr=2e-4")
    sh(repo, "git", "checkout", "-q", "--", ".")
    sh(repo, "dvc", "checkout", "-q")
    times["exp_run_finetune_lr"] = sh(repo, "dvc", "exp", "run", "-S", "finetune.lr=2e-5")
    return times


def floors(repo: Path, args: argparse.Namespace) -> dict[str, float]:
    """The least work each phase must do, timed in-process, without DVC or stage start-up."""
    import pandas as pd

    from twophase.backbones import describe
    from twophase.batches import BatchOrder, array_batches
    from twophase.images import ImageBatches, ImageDataset
    from twophase.model import Preprocessing, build_head, build_model
    from twophase.network import FrozenTrunk, Tail, set_trainable
    from twophase.train import run_epoch

    split = pd.read_csv(repo / "data/split.csv")
    family = describe(build_model("resnet18", "none", 224), "resnet18")
    # the floors get the layout measured fastest here (channels-last), like the pipeline
    trunk = FrozenTrunk(build_model("resnet18", "none", args.image_size), family, "layer4").eval()
    trunk.to(memory_format=torch.channels_last)
    dataset = ImageDataset(
        split["path"].tolist(), split["label"].tolist(), args.image_size, Preprocessing()
    )
    loader = ImageBatches(dataset, BatchOrder(len(dataset), 64, False), args.workers)
    start = time.perf_counter()
    with torch.inference_mode():
        for images, _ in loader:
            trunk(images.contiguous(memory_format=torch.channels_last))
    trunk_pass = time.perf_counter() - start

    train = split[split["subset"] == "train"]
    shape = (len(train), 256, args.image_size // 16, args.image_size // 16)
    activations = torch.randn(shape).numpy()
    model = build_model("resnet18", "none", args.image_size)
    model.fc = build_head(512, [256], 0.3, int(split["label"].nunique()))
    tail = Tail(model, family, "layer4")
    set_trainable(model, tail)
    tail.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam([p for p in tail.parameters() if p.requires_grad], lr=1e-5)
    labels = train["label"].to_numpy()
    batches = array_batches(activations, labels, args.batch_size, shuffle=True)
    run_epoch(tail, batches, torch.device("cpu"), None, optimizer)  # warm-up
    start = time.perf_counter()
    run_epoch(tail, batches, torch.device("cpu"), None, optimizer)
    return {
        "trunk_pass_all_images": trunk_pass,
        "phase2_epoch_fwd_bwd": time.perf_counter() - start,
    }


def summarize(result: dict[str, Any]) -> dict[str, float]:
    t, nb, fl, m = result["twophase"], result["notebook"], result["floors"], result["metrics"]
    phase1 = t["features"] + t["train_transfer"]
    dag = sum(t[s] for s in STAGES)
    phase2_epoch = m["finetune"]["wall_seconds"] / m["finetune"]["epochs_run"]
    return {
        "phase1_speedup": nb["transfer_s"] / phase1,
        "dag_speedup": (nb["transfer_s"] + nb["finetune_s"]) / dag,
        "phase2_epoch_over_floor": phase2_epoch / fl["phase2_epoch_fwd_bwd"],
        "features_stage_over_trunk_floor": t["features"] / fl["trunk_pass_all_images"],
        "exp_run_finetune_lr_over_phase2_floor": t["exp_run_finetune_lr"]
        / (fl["phase2_epoch_fwd_bwd"] * m["finetune"]["epochs_run"]),
        "phase2_epoch_s": phase2_epoch,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--transfer-epochs", type=int, default=50)
    parser.add_argument("--finetune-epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2, help="image-decoding processes")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/twophase-bench"))
    parser.add_argument("--jpeg-size", default="500x375", help="synthetic photo size, WxH")
    parser.add_argument("--skip-notebook", action="store_true")
    parser.add_argument(
        "--floors-only",
        action="store_true",
        help="measure only the floors (after the download and split stages)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.quick:
        args.images, args.classes, args.image_size = 40, 2, 64
        args.transfer_epochs, args.finetune_epochs = 2, 1

    width, height = (int(v) for v in args.jpeg_size.split("x"))
    data = make_imagefolder(
        args.workdir / f"images-{args.images}-{args.classes}-{args.jpeg_size}",
        args.images,
        args.classes,
        size=(width, height),
    )
    result: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        },
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    print(f"data: {args.images} synthetic JPEGs in {data}", flush=True)
    repo = twophase_project(args.workdir, data, args)
    if args.floors_only:
        sh(repo, "dvc", "repro", "split")
        print("floors:", json.dumps(floors(repo, args), indent=1))
        return
    result["twophase"] = time_twophase(repo)
    result["metrics"] = {
        p: json.loads((repo / f"metrics/{s}.json").read_text())
        for p, s in (("transfer", "train_transfer"), ("finetune", "finetune"))
    }
    print("twophase:", json.dumps(result["twophase"], indent=1), flush=True)
    result["floors"] = floors(repo, args)
    print("floors:", json.dumps(result["floors"], indent=1), flush=True)
    if not args.skip_notebook:
        nb = run_notebook(
            data,
            transfer_epochs=args.transfer_epochs,
            finetune_epochs=args.finetune_epochs,
            batch_size=args.batch_size,
            patience=max(args.transfer_epochs, args.finetune_epochs) + 1,
            workers=args.workers,
        )
        result["notebook"] = vars(nb)
        print("notebook:", json.dumps(result["notebook"], indent=1), flush=True)
        result["ratios"] = summarize(result)
        print("ratios:", json.dumps(result["ratios"], indent=1), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
