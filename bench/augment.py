"""Benchmark: augmented cached views and streamed phase 2, accuracy and wall time.

On the same data and seed, for views 0 / 2 / 4 (phase 2 on the cache) and for the streamed path
(views 0, `finetune.input: images`, fresh augmentation each epoch), it runs the DAG stage by stage
(`dvc repro --single-item`) and records each stage's wall time and both phases' best validation
accuracy; then, on the views-4 workspace, the time of `dvc exp run -S train_transfer.lr=...` and
which stages it ran (features must be skipped).

    python bench/augment.py --data photos      # synthetic photo-like JPEGs (bench/synth.py)
    python bench/augment.py --data digits      # scikit-learn's digits at 32 px
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from run import STAGES, copy_project, sh  # noqa: E402
from synth import make_imagefolder  # noqa: E402

VARIANTS: dict[str, dict[str, Any]] = {
    "views 0 (cached)": {"features.views": 0, "finetune.input": "cached"},
    "views 2 (cached)": {"features.views": 2, "finetune.input": "cached"},
    "views 4 (cached)": {"features.views": 4, "finetune.input": "cached"},
    "streamed (views 0, finetune.input: images)": {"features.views": 0, "finetune.input": "images"},
}


def project(workdir: Path, args: argparse.Namespace) -> Path:
    repo = workdir / f"project-{args.data}"
    subprocess.run(["rm", "-rf", str(repo)], check=True)
    repo.mkdir(parents=True)
    copy_project(repo)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    if args.data == "photos":
        data = make_imagefolder(workdir / "photos", args.images)
        params["data"].update(dataset="imagefolder", root=str(data), image_size=224)
    else:
        params["data"].update(dataset="digits", image_size=32)
    params["model"]["weights"] = "none"
    params["features"]["num_workers"] = args.workers
    params["train_transfer"].update(lr=1e-3, epochs=args.transfer_epochs)
    params["finetune"].update(lr=3e-4, epochs=args.finetune_epochs)
    for section in ("train_transfer", "finetune"):  # every epoch runs: equal work per variant
        params[section]["patience"] = params[section]["epochs"] + 1
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(repo, "git", "init", "-q")  # .dvc/ came with the project files
    commit(repo)
    return repo


def commit(repo: Path) -> None:
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-qm", "bench")


def set_params(repo: Path, values: dict[str, Any]) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for key, value in values.items():
        section, name = key.split(".")
        params[section][name] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def run_variant(repo: Path, values: dict[str, Any]) -> dict[str, Any]:
    set_params(repo, values)
    times = {stage: round(sh(repo, "dvc", "repro", "--single-item", stage), 1) for stage in STAGES}
    metrics = {
        name: json.loads((repo / "metrics" / f"{name}.json").read_text())
        for name in ("train_transfer", "finetune", "evaluate")
    }
    return {
        "seconds": times,
        "phase1_val_acc": metrics["train_transfer"]["best_val_acc"],
        "phase2_val_acc": metrics["finetune"]["best_val_acc"],
        "phase1_test_acc": metrics["evaluate"]["transfer"]["accuracy"],
        "phase2_test_acc": metrics["evaluate"]["finetune"]["accuracy"],
        "finetune_training_seconds": metrics["finetune"]["wall_seconds"],
    }


def exp_run_transfer_lr(repo: Path) -> dict[str, Any]:
    commit(repo)
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    start = time.perf_counter()
    done = subprocess.run(
        ["dvc", "exp", "run", "-S", "train_transfer.lr=2e-3"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    seconds = time.perf_counter() - start
    ran = re.findall(r"Running stage '(\w+)'", done.stdout + done.stderr)
    return {"seconds": round(seconds, 1), "stages_run": ran}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", choices=("photos", "digits"), default="photos")
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--transfer-epochs", type=int, default=30)
    parser.add_argument("--finetune-epochs", type=int, default=8)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/twophase-bench-augment"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    repo = project(args.workdir, args)
    results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}
    for name, values in VARIANTS.items():
        results[name] = run_variant(repo, values)
        print(name, json.dumps(results[name]), flush=True)
    set_params(repo, VARIANTS["views 4 (cached)"])
    for stage in STAGES:
        sh(repo, "dvc", "repro", "--single-item", stage)
    results["exp run -S train_transfer.lr=2e-3 (views 4)"] = exp_run_transfer_lr(repo)
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
