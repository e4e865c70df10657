"""Benchmark: the accuracy toolkit on a real transfer task, offline (digits 0-4 -> digits 5-9).

No pretrained ImageNet weights reach the project's machine, so this builds the transfer itself.
SOURCE task: scikit-learn's bundled digits 0-4 (about 900 images). A backbone (resnet18 at 32 px
by default) is trained from scratch on them with plain PyTorch, and its state dict saved as a
local weights file (`model.weights: <path>`). TARGET task: digits 5-9, as an ImageFolder with
30 training images per class and the other ~150 per class as the test split. It is a real
transfer task: the source and target classes are disjoint and the backbone never saw an image
of a target class, so phase 1 measures how well features learned on other classes carry over,
and phase 2 how much adapting the last block adds, as ImageNet -> Pets does at full scale. It is
a near transfer (same domain: 8x8 grey digits upscaled to 32 px), on a small test split (~750
images: one image is 0.13 points), so differences below a point or two are noise; flips and
large crops can change a digit's identity, which the augmentation settings should show.

For each setting (a list of `-S` overrides, SETTINGS below) and seed, the harness runs the real
pipeline with `dvc exp run -S seed=<seed> -S ...` in a scratch copy of this checkout (params
that do not exist in the checkout fail that run, recorded as such, and the others go on), then
reads phase 1's and phase 2's test accuracy from metrics/evaluate.json (and the TTA accuracy
where it holds one) and the run's wall time. Why `dvc exp run` in the workspace of a scratch
copy, not `--temp` or calling the stage scripts: it is what a user runs, DVC decides what
reruns (a setting that only changes evaluation reruns only `evaluate`), unknown params fail as
they would for a user, and the metrics are plain files in the workspace afterwards (a `--temp`
run's are readable only through `dvc exp show`). params.yaml is restored to the task's base
before every run, so settings never stack.

Wall time is the `dvc exp run`'s, on top of the outputs already there: every seed runs
`default` first (the whole pipeline, its split being seeded), and a setting then reruns only the
stages its params reach (the `stages` column) -- the cost of trying it at cache speed.

    python bench/transfer_task.py --out /tmp/transfer                  # every setting, seeds 0 1 2
    python bench/transfer_task.py --out /tmp/transfer --settings default tta --seeds 0
    python bench/transfer_task.py --out /tmp/transfer --quick --settings default --seeds 0
    python bench/transfer_task.py --out /tmp/transfer --arch efficientnet_b0   # has drop path

It writes DIR/results.md (mean +- std per setting), DIR/results.csv (one row per run),
DIR/pretrain.json (the backbone's training time and source accuracy) and keeps the scratch
project in DIR/project (`dvc exp show` there lists every run).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

BENCH = Path(__file__).resolve().parent
PROJECT = BENCH.parent
sys.path.insert(0, str(PROJECT / "src"))
sys.path.insert(0, str(BENCH))

from run import copy_project  # noqa: E402

sys.path.insert(0, str(PROJECT))
from scripts.recipe import recipe_args  # noqa: E402
from twophase.params import flatten  # noqa: E402

# name -> the `-S` overrides of that setting, passed to `dvc exp run` unchanged
SETTINGS: dict[str, list[str]] = {
    "default": [],
    "tta": ["evaluate.tta=flip"],
    "ema": ["finetune.ema=0.99"],
    "mixup": ["train_transfer.mixup=0.2", "finetune.mixup=0.2"],
    "class_weights": ["train_transfer.class_weights=balanced", "finetune.class_weights=balanced"],
    "drop_path": ["model.drop_path=0.1"],  # refused by the validate stage for a ResNet
    "drop_path_off": ["model.drop_path=0"],  # no stochastic depth (null: the library's rate)
    "rand_augment": ["data.augment=[rand_augment]", "features.views=4"],
    "random_erasing": ["data.augment=[random_erasing]", "features.views=4"],
}
# each recipe of recipes/ (the README's recipe table) on top of the task's params, as
# `make recipe` applies it on top of params.yaml
SETTINGS |= {
    f"recipe-{path.stem}": recipe_args(path)[1::2]
    for path in sorted((PROJECT / "recipes").glob("*.yaml"))
}
# the target task's params on top of params.yaml's defaults (the digits recipe of the Makefile)
BASE: dict[str, Any] = {
    "data.dataset": "imagefolder",
    "data.image_size": 32,
    "features.num_workers": 0,
    "train_transfer.lr": 1e-3,
    "train_transfer.epochs": 30,
    "finetune.lr": 3e-4,
    "finetune.epochs": 10,
}
QUICK: dict[str, Any] = {"train_transfer.epochs": 2, "finetune.epochs": 1}
SOURCE_CLASSES = ("0", "1", "2", "3", "4")
TARGET_CLASSES = ("5", "6", "7", "8", "9")
TARGET_TRAIN_PER_CLASS = 30
DATA_SEED = 0  # the target's train/test choice and the pretraining: the same for every run
COLUMNS = (
    "setting",
    "seed",
    "status",
    "phase1_acc",
    "phase2_acc",
    "phase1_acc_tta",
    "phase2_acc_tta",
    "wall_s",
    "phase1_train_s",
    "phase2_train_s",
    "stages",
    "overrides",
    "error",
)


def make_tasks(data: Path) -> tuple[Path, Path]:
    """The source (digits 0-4, one folder per class) and target (digits 5-9, train/ and test/)
    image folders, from the project's own digits export (the PNGs the digits pipeline reads)."""
    from twophase.datasets import export_digits

    source, target = data / "source", data / "target"
    if source.is_dir() and target.is_dir():
        return source, target
    exported = export_digits(data / "digits")  # train/<digit>/*.png and test/<digit>/*.png
    building = data / "building"  # renamed into place once whole: a killed run leaves no half
    shutil.rmtree(building, ignore_errors=True)
    rng = np.random.default_rng(DATA_SEED)
    for digit in SOURCE_CLASSES + TARGET_CLASSES:
        files = sorted(exported.glob(f"*/{digit}/*.png"), key=lambda p: p.name)
        if digit in SOURCE_CLASSES:
            chosen = {path: building / "source" / digit for path in files}
        else:
            order = rng.permutation(len(files))
            chosen = {
                files[i]: building
                / "target"
                / ("train" if rank < TARGET_TRAIN_PER_CLASS else "test")
                / digit
                for rank, i in enumerate(order)
            }
        for path, folder in chosen.items():
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, folder / path.name)
    (building / "source").rename(source)
    (building / "target").rename(target)
    building.rmdir()
    return source, target


def pretrain(
    source: Path, arch: str, image_size: int, epochs: int, out: Path
) -> dict[str, float | int | str]:
    """Train `arch` from scratch on the source digits; save its state dict (torchvision's keys,
    so `model.weights: <out>` loads it; the pipeline drops the 5-class classifier).

    Images go through the eval transform the pipeline applies to the target images (resize,
    centre crop, ImageNet normalisation: the default preprocessing of a local weights file),
    plus random shifts of up to 3 pixels; 20 % of each class is held out to report the source
    accuracy. SGD with momentum, cosine LR, label smoothing 0.1: a plain recipe."""
    import torchvision

    from twophase.images import ImageDataset
    from twophase.model import Preprocessing, build_model, model_kwargs

    paths = sorted(source.glob("*/*.png"))
    labels = [SOURCE_CLASSES.index(p.parent.name) for p in paths]
    dataset = ImageDataset([str(p) for p in paths], labels, image_size, Preprocessing())
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    targets = torch.tensor(labels)
    rng = np.random.default_rng(DATA_SEED)
    held = np.zeros(len(paths), dtype=bool)
    for label in range(len(SOURCE_CLASSES)):
        rows = np.flatnonzero(targets.numpy() == label)
        held[rng.choice(rows, size=len(rows) // 5, replace=False)] = True
    train_x, train_y = images[~held], targets[~held]
    val_x, val_y = images[held], targets[held]

    torch.manual_seed(DATA_SEED)
    kwargs = model_kwargs(arch, "none", image_size)
    model = torchvision.models.get_model(arch, weights=None, num_classes=5, **kwargs)
    steps_per_epoch = math.ceil(len(train_x) / 64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=0.05, total_steps=max(1, epochs * steps_per_epoch)
    )
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(train_x))
        for step in range(steps_per_epoch):
            rows = order[step * 64 : (step + 1) * 64]
            batch = shifted(train_x[rows], 3)
            loss = loss_fn(model(batch), train_y[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        print(f"pretrain epoch {epoch + 1}/{epochs}: loss {loss.item():.4f}", flush=True)
    seconds = time.perf_counter() - start
    model.eval()
    with torch.inference_mode():
        accuracy = (model(val_x).argmax(1) == val_y).float().mean().item()
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out)
    build_model(arch, str(out), image_size)  # the pipeline's own loader accepts the file
    return {
        "arch": arch,
        "image_size": image_size,
        "epochs": epochs,
        "source_train_images": len(train_x),
        "source_val_accuracy": round(accuracy, 4),
        "pretrain_seconds": round(seconds, 1),
        "weights": str(out),
    }


def shifted(batch: torch.Tensor, pixels: int) -> torch.Tensor:
    """Each image moved by up to `pixels` in x and y (zero padding: the normalised mean)."""
    padded = torch.nn.functional.pad(batch, [pixels] * 4)
    size = batch.shape[-1]
    out = torch.empty_like(batch)
    for i, (dy, dx) in enumerate(torch.randint(0, 2 * pixels + 1, (len(batch), 2)).tolist()):
        out[i] = padded[i, :, dy : dy + size, dx : dx + size]
    return out


def env() -> dict[str, str]:
    """DVC and the stages it starts use this interpreter's environment."""
    return {
        **os.environ,
        "DVC_NO_ANALYTICS": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }


def git(repo: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", *args],
        cwd=repo,
        check=True,
        capture_output=True,
    )


def scratch_project(repo: Path, base: dict[str, Any]) -> None:
    """A fresh copy of this checkout (tracked and untracked files) with the task's params."""
    if repo.exists():
        shutil.rmtree(repo)
    repo.mkdir(parents=True)
    copy_project(repo)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for key, value in base.items():
        section, name = key.split(".")
        params[section][name] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "transfer task base")


def run_one(repo: Path, setting: str, overrides: list[str], seed: int) -> dict[str, Any]:
    """One `dvc exp run` of `overrides` on the base params; its scores, or why it failed."""
    git(repo, "checkout", "-q", "--", "params.yaml")  # settings never stack
    command = ["dvc", "exp", "run", "-S", f"seed={seed}"]
    for override in overrides:
        command += ["-S", override]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=repo, env=env(), capture_output=True, text=True)
    wall = time.perf_counter() - start
    output = done.stdout + done.stderr
    row: dict[str, Any] = {
        "setting": setting,
        "seed": seed,
        "wall_s": round(wall, 1),
        "stages": " ".join(re.findall(r"Running stage '(\w+)'", output)),
        "overrides": " ".join(overrides),
    }
    if done.returncode != 0:
        (repo.parent / "logs").mkdir(exist_ok=True)
        (repo.parent / "logs" / f"{setting}-{seed}.log").write_text(output)
        return {**row, "status": "failed", "error": error_line(output)}
    metrics = json.loads((repo / "metrics" / "evaluate.json").read_text())
    flat = flatten(metrics)
    for phase, column in (("transfer", "phase1"), ("finetune", "phase2")):
        row[f"{column}_acc"] = flat[f"{phase}.accuracy"]
        row[f"{column}_acc_tta"] = tta_accuracy(flat, phase)
        summary = json.loads((repo / "metrics" / f"{phase_file(phase)}.json").read_text())
        row[f"{column}_train_s"] = summary.get("wall_seconds")
    return {**row, "status": "ok", "error": ""}


def phase_file(phase: str) -> str:
    return "train_transfer" if phase == "transfer" else "finetune"


def error_line(output: str) -> str:
    """The line that says why a run failed: twophase's one line, else DVC's ERROR line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for marker in ("twophase: error:", "ERROR:"):
        found = [line for line in lines if line.startswith(marker)]
        if found:
            return found[-1].split(" (this value now stands in params.yaml")[0][:300]
    return lines[-1][:300] if lines else "no output"


def tta_accuracy(flat: dict[str, Any], phase: str) -> float | None:
    """The phase's test accuracy with TTA (`transfer_tta.accuracy` in metrics/evaluate.json);
    None where the run had no TTA."""
    value = flat.get(f"{phase}_tta.accuracy")
    return float(value) if isinstance(value, int | float) else None


def mean_std(values: list[float], digits: int = 4) -> str:
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table(rows: list[dict[str, Any]], settings: list[str], pretrained: dict[str, Any]) -> str:
    """Markdown: one line per setting, mean ± sample std over its successful seeds."""
    lines = [
        "# The accuracy toolkit on a real transfer task (digits 0-4 -> digits 5-9)",
        "",
        f"Backbone: {pretrained['arch']} at {pretrained['image_size']} px, trained from scratch "
        f"on the source digits 0-4 for {pretrained['epochs']} epochs "
        f"({pretrained['pretrain_seconds']} s; source held-out accuracy "
        f"{pretrained['source_val_accuracy']}). Target: digits 5-9, "
        f"{TARGET_TRAIN_PER_CLASS} training images per class. Test accuracy, mean ± std over "
        "seeds; wall: seconds of the `dvc exp run` on top of the outputs already there "
        "(`default` runs first for each seed).",
        "",
        "| setting | overrides | seeds | phase 1 | phase 2 | phase 1 TTA | phase 2 TTA | wall s |"
        " stages rerun |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for setting in settings:
        mine = [row for row in rows if row["setting"] == setting]
        done = [row for row in mine if row["status"] == "ok"]
        overrides = " ".join(f"`{o}`" for o in SETTINGS[setting]) or "(none)"
        if not done:
            errors = {row["error"] for row in mine}
            failed = f"failed: {'; '.join(sorted(errors))}"
            lines.append(f"| {setting} | {overrides} | 0 of {len(mine)} | {failed} | | | | | |")
            continue

        def column(name: str, digits: int = 4, runs: list[dict[str, Any]] = done) -> str:
            return mean_std([float(r[name]) for r in runs if r[name] is not None], digits)

        stages = sorted({r["stages"] for r in done})
        lines.append(
            f"| {setting} | {overrides} | {len(done)} of {len(mine)} | {column('phase1_acc')} | "
            f"{column('phase2_acc')} | {column('phase1_acc_tta')} | {column('phase2_acc_tta')} "
            f"| {column('wall_s', 1)} | {' / '.join(stages)} |"
        )
    return "\n".join(lines) + "\n"


def write_rows(rows: list[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="", encoding="utf-8") as out:
        writer = csv.DictWriter(out, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({column: row.get(column, "") for column in COLUMNS})


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="results and scratch folder")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--arch", default="resnet18", help="a torchvision arch to pretrain")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--pretrain-epochs", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="smoke run: 1-2 epochs everywhere")
    parser.add_argument("--pretrain-only", action="store_true", help="stop after pretraining")
    args = parser.parse_args()
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    epochs = 1 if args.quick else args.pretrain_epochs

    source, target = make_tasks(out / "data")
    weights = out / f"backbone-{args.arch}-{args.image_size}px-{epochs}ep.pt"
    info_path = out / f"{weights.stem}.json"
    if weights.is_file() and info_path.is_file():
        pretrained = json.loads(info_path.read_text())
        print(f"pretrained backbone reused: {weights}")
    else:
        pretrained = pretrain(source, args.arch, args.image_size, epochs, weights)
        info_path.write_text(json.dumps(pretrained, indent=2) + "\n")
    shutil.copy2(info_path, out / "pretrain.json")
    print(f"pretraining: {json.dumps(pretrained)}", flush=True)
    if args.pretrain_only:
        return

    base = {
        **BASE,
        "data.root": str(target),
        "data.image_size": args.image_size,
        "model.arch": args.arch,
        "model.weights": str(weights),
        **(QUICK if args.quick else {}),
    }
    repo = out / "project"
    scratch_project(repo, base)
    settings = ["default", *[s for s in args.settings if s != "default"]]
    settings = [s for s in settings if s in args.settings]
    rows: list[dict[str, Any]] = []
    for seed in args.seeds:
        for setting in settings:
            row = run_one(repo, setting, SETTINGS[setting], seed)
            rows.append(row)
            shown = {k: row.get(k) for k in ("phase1_acc", "phase2_acc", "wall_s", "error")}
            print(f"{setting} seed {seed}: {row['status']} {shown}", flush=True)
            write_rows(rows, out / "results.csv")  # after every run: partial results survive
    (out / "results.md").write_text(table(rows, settings, pretrained), encoding="utf-8")
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()
