"""Fixed costs of the stages: process start-up, imports, and DVC's own share, on the digits DAG.

In one run, on a digits project (the `make digits` params) that has been reproduced once:
  - `python -c "import torch"`: the baseline every ratio is taken against;
  - per stage, start-up: a process that imports the stage's module and exits (what runs before
    the first line of real work), median of 3;
  - per stage, `python stages/<stage>.py` (the whole stage, no DVC), median of 3;
  - per stage, `dvc repro --force --single-item <stage>`: the difference to the line above is
    DVC's share (reading the lock, hashing dependencies and outputs, writing the lock);
and prints a table (JSON with --json).

    python bench/startup.py --json /tmp/startup.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from run import STAGES, copy_project  # noqa: E402

DIGITS = {
    "data": {"dataset": "digits", "image_size": 32},
    "model": {"weights": "none"},
    "features": {"num_workers": 0},
    "train_transfer": {"lr": 0.001, "epochs": 30},
    "finetune": {"lr": 0.0003, "epochs": 10},
}


def seconds(command: list[str], cwd: Path, repeats: int = 3) -> float:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(command, cwd=cwd, env=env, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return round(statistics.median(times), 2)


def project(workdir: Path, cache_type: str | None = None) -> Path:
    repo = workdir / "project"
    subprocess.run(["rm", "-rf", str(repo)], check=True)
    repo.mkdir(parents=True)
    copy_project(repo)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for section, values in DIGITS.items():
        params[section].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    config = [["dvc", "config", "cache.type", cache_type]] if cache_type else []
    for command in (
        ["git", "init", "-q"],
        *config,
        ["git", "add", "-A"],
        ["git", "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-qm", "b"],
        ["dvc", "repro"],
    ):
        subprocess.run(command, cwd=repo, env=env, check=True, capture_output=True)
    return repo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/twophase-bench-startup"))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--cache-type", help="e.g. hardlink: DVC links outputs, never copies")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    repo = project(args.workdir, args.cache_type)
    python = sys.executable
    result: dict[str, object] = {
        "cache.type": args.cache_type or "default (reflink, copy)",
        "python": seconds([python, "-c", "pass"], repo, args.repeats),
        "import torch": seconds([python, "-c", "import torch"], repo, args.repeats),
    }
    for stage in STAGES:
        start_up = f"import sys; sys.path.insert(0, 'stages'); import {stage}"
        alone = seconds([python, f"stages/{stage}.py"], repo, args.repeats)
        with_dvc = seconds(["dvc", "repro", "--force", "--single-item", stage], repo, args.repeats)
        result[stage] = {
            "start_up": seconds([python, "-c", start_up], repo, args.repeats),
            "stage": alone,
            "dvc_repro": with_dvc,
            "dvc_share": round(with_dvc - alone, 2),
        }
        print(stage, result[stage], flush=True)
    base = float(result["import torch"])  # type: ignore[arg-type]
    for stage in ("train_transfer", "evaluate"):
        stage_s = result[stage]["stage"]  # type: ignore[index]
        result[f"{stage} / import torch"] = round(stage_s / base, 2)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
