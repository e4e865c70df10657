"""The real thing: `dvc repro` and `dvc exp run` in a temporary git repo, on offline digits."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from tests.helpers import PROJECT
from twophase.params import Params, read_yaml, to_dict

pytestmark = pytest.mark.e2e

TINY_DIGITS = {
    "data": {"dataset": "digits", "image_size": 16},
    "model": {"weights": "none"},
    "features": {"num_workers": 0},
    "train_transfer": {"lr": 0.003, "epochs": 3},
    "finetune": {"epochs": 1},
}
TRACKED_RESULTS = (
    "metrics/train_transfer.json",
    "metrics/finetune.json",
    "metrics/evaluate.json",
    "plots/train_transfer/history.csv",
    "plots/finetune/history.csv",
    "plots/evaluate/predictions_finetune.csv",
)
STAGES = tuple(yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"])


def project_files() -> list[str]:
    """The project as git sees it, with uncommitted edits, without the workspace's run outputs."""

    def listed(*flags: str) -> list[str]:
        done = subprocess.run(
            ["git", "ls-files", *flags], cwd=PROJECT, check=True, capture_output=True, text=True
        )
        return done.stdout.split()

    untracked = [
        f
        for f in listed("-o", "--exclude-standard")
        if f != "dvc.lock" and not f.startswith(("metrics/", "plots/", "data/"))
    ]
    return [f for f in listed("-c") + untracked if (PROJECT / f).is_file()]


def copy_project(repo: Path, overrides: dict) -> None:
    """The project's files, with the reference params (not whatever the workspace applied)."""
    for name in project_files():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(PROJECT / name, repo / name)
    (repo / "params.yaml").write_text(yaml.safe_dump(to_dict(Params()), sort_keys=False))
    set_params(repo / "params.yaml", overrides)


def set_params(path: Path, overrides: dict) -> None:
    params = read_yaml(path.read_text())  # the project's loader: `1e-05` is a float
    for section, values in overrides.items():
        if isinstance(values, dict):
            params[section].update(values)
        else:
            params[section] = values
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def run(repo: Path, *args: str, check: bool = True) -> str:
    """Run a command in `repo`; with `check`, it must succeed, else it must fail."""
    bin_dir = Path(sys.executable).parent
    env = {
        **os.environ,
        "DVC_NO_ANALYTICS": "1",
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
    }
    done = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True)
    output = done.stdout + done.stderr
    assert (done.returncode == 0) == check, (
        f"{' '.join(args)} exit {done.returncode}:\n{output[-4000:]}"
    )
    return output


def run_queue(repo: Path, timeout_s: float = 600) -> str:
    """`dvc queue start` one worker, wait until nothing is queued or running; the final status."""
    run(repo, "dvc", "queue", "start", "-j", "1")
    deadline = time.monotonic() + timeout_s
    status = ""
    while time.monotonic() < deadline:
        status = run(repo, "dvc", "queue", "status")
        if not re.search(r"\b(Queued|Running)\b", status):
            break
        time.sleep(2)
    return status


def ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '(\w+)'", output))


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("project")
    copy_project(repo, TINY_DIGITS)
    run(repo, "git", "init", "-q")
    run(repo, "git", "add", "-A")
    run(repo, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "tiny")
    output = run(repo, "dvc", "repro")
    assert ran(output) == set(STAGES)
    run(repo, "git", "add", "-A")
    run(repo, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "repro")
    return repo


def test_repro_writes_every_declared_output(repo: Path) -> None:
    evaluation = json.loads((repo / "metrics/evaluate.json").read_text())
    assert set(evaluation) == {"test_images", "transfer", "finetune", "delta"}
    assert evaluation["test_images"] == 450
    for phase in ("train_transfer", "finetune"):
        summary = json.loads((repo / f"metrics/{phase}.json").read_text())
        assert summary["epochs_run"] >= 1 and summary["wall_seconds"] > 0
    for name in (
        "models/transfer.pt",
        "models/finetune.pt",
        "plots/report.md",
        "plots/figures/loss.png",
        "plots/figures/grid_finetune.png",
        "plots/figures/confusion_transfer.png",
        "data/activations/test_activations.npy",
        "data/embeddings/test_embeddings.npy",
    ):
        assert (repo / name).is_file(), name
    assert "![loss curves](figures/loss.png)" in (repo / "plots/report.md").read_text()
    assert "No changes" in run(repo, "dvc", "status") or "up to date" in run(repo, "dvc", "status")


def test_changing_finetune_lr_reruns_only_finetune_and_below(repo: Path) -> None:
    output = run(repo, "dvc", "exp", "run", "-S", "finetune.lr=3e-5")
    assert ran(output) == {"validate", "finetune", "evaluate", "export", "report"}
    for stage in ("download", "index", "split", "features", "train_transfer"):
        assert f"Stage '{stage}' didn't change, skipping" in output


def test_changing_transfer_lr_does_not_recompute_features(repo: Path) -> None:
    output = run(repo, "dvc", "exp", "run", "-S", "train_transfer.lr=0.002")
    assert ran(output) == {"validate", "train_transfer", "finetune", "evaluate", "export", "report"}
    assert "Stage 'features' didn't change, skipping" in output


def test_changing_val_ratio_reruns_split_and_below(repo: Path) -> None:
    output = run(repo, "dvc", "exp", "run", "-S", "data.val_ratio=0.25")
    assert ran(output) == set(STAGES) - {"download", "index"}


def test_changing_unfreeze_recomputes_activations_but_not_phase_one(repo: Path) -> None:
    run(repo, "git", "checkout", "-q", "--", ".")
    run(repo, "dvc", "checkout", "-q")
    embeddings = (repo / "data/embeddings/train_embeddings.npy").read_bytes()
    output = run(repo, "dvc", "exp", "run", "-S", "finetune.unfreeze=[layer3,layer4]")
    assert ran(output) == {"validate", "features", "finetune", "evaluate", "export", "report"}
    assert "Stage 'train_transfer' didn't change, skipping" in output
    assert (repo / "data/embeddings/train_embeddings.npy").read_bytes() == embeddings
    assert json.loads((repo / "data/activations/meta.json").read_text())["cut"] == "layer3"


def test_augmented_views_and_streamed_phase_two_through_dvc(repo: Path) -> None:
    run(repo, "git", "checkout", "-q", "--", ".")
    run(repo, "dvc", "checkout", "-q")
    output = run(repo, "dvc", "exp", "run", "-S", "features.views=2", "-S", "finetune.input=images")
    assert ran(output) == set(STAGES) - {"download", "index", "split"}, output[-2000:]
    assert (repo / "data/embeddings/train_views_embeddings.npy").is_file()
    assert not (repo / "data/activations/train_activations.npy").exists()
    assert (repo / "data/activations/test_activations.npy").is_file()
    output = run(repo, "dvc", "exp", "run", "-S", "train_transfer.lr=0.004")
    assert ran(output) == {"validate", "train_transfer", "finetune", "evaluate", "export", "report"}
    assert "Stage 'features' didn't change, skipping" in output
    run(repo, "git", "checkout", "-q", "--", ".")
    run(repo, "dvc", "checkout", "-q")


def test_two_processes_run_the_dag_under_torchrun_with_gloo(repo: Path) -> None:
    """compute.nproc: 2 on this CPU: features, train_transfer and finetune each relaunch under
    torchrun; the feature cache equals one process's (compute is speed-only: --force, and only
    the stages that run several processes, then evaluate)."""
    import numpy as np

    run(repo, "git", "checkout", "-q", "--", ".")
    run(repo, "dvc", "checkout", "-q")
    before = {
        name: np.load(repo / "data" / name)
        for name in ("embeddings/train_embeddings.npy", "activations/val_activations.npy")
    }
    set_params(repo / "params.yaml", {"compute": {"nproc": 2}})
    distributed = ("features", "train_transfer", "finetune")
    stages = ("validate", *distributed, "evaluate")  # validate checks nproc against the GPUs
    output = run(repo, "dvc", "repro", "--force", "--single-item", *stages)
    assert ran(output) == set(stages), output[-2000:]
    assert output.count("torchrun: 2 processes, backend gloo, on cpu") == 3, output[-3000:]
    for name, values in before.items():
        np.testing.assert_allclose(np.load(repo / "data" / name), values, rtol=1e-5, atol=1e-6)
    summary = json.loads((repo / "metrics/evaluate.json").read_text())
    assert 0.0 <= summary["finetune"]["accuracy"] <= 1.0
    history = (repo / "plots/finetune/history.csv").read_text().splitlines()
    assert len(history) == 1 + 1 + TINY_DIGITS["finetune"]["epochs"], "rank 0 alone wrote it"
    run(repo, "git", "checkout", "-q", "--", ".")
    run(repo, "dvc", "checkout", "-q")


def test_linked_dvc_cache_stays_intact_when_stages_rerun(repo: Path) -> None:
    """cache.type hardlink: outputs are links into .dvc/cache; a rerun must replace them (new
    file, rename), never write through a link into the cache."""
    import hashlib

    run(repo, "git", "checkout", "-q", "--", ".")
    run(repo, "dvc", "config", "--local", "cache.type", "hardlink")
    try:
        run(repo, "dvc", "checkout", "-q", "--relink")
        assert (repo / "data/activations/train_activations.npy").stat().st_nlink == 2
        output = run(repo, "dvc", "exp", "run", "-S", "features.dtype=float16")
        assert {"features", "finetune"} <= ran(output), output[-2000:]
        cached = [p for p in (repo / ".dvc/cache/files/md5").rglob("*") if p.is_file()]
        assert len(cached) > 10
        for path in cached:
            if path.suffix == ".dir":
                continue
            digest = hashlib.md5(path.read_bytes()).hexdigest()
            assert digest == path.parent.name + path.name, f"{path} was written through a link"
        assert "modified" not in run(repo, "dvc", "status")
    finally:
        run(repo, "dvc", "config", "--local", "--unset", "cache.type")
        run(repo, "git", "checkout", "-q", "--", ".")
        run(repo, "dvc", "checkout", "-q", "--relink")


def test_speed_only_params_rerun_nothing(repo: Path) -> None:
    run(repo, "git", "checkout", "-q", "--", ".")
    run(repo, "dvc", "checkout", "-q")
    output = run(repo, "dvc", "exp", "run", "-S", "features.num_workers=1")
    assert ran(output) == {"validate"}, output  # it checks every key; nothing computes


def test_phase_two_history_starts_with_its_validated_starting_weights(repo: Path) -> None:
    run(repo, "git", "checkout", "-q", "--", ".")
    phase1 = (repo / "plots/train_transfer/history.csv").read_text().splitlines()
    phase2 = (repo / "plots/finetune/history.csv").read_text().splitlines()
    assert phase2[1].split(",")[0] == phase1[-1].split(",")[0], "epoch 0 of phase 2"
    summary = json.loads((repo / "metrics/finetune.json").read_text())
    transfer = json.loads((repo / "metrics/train_transfer.json").read_text())
    assert summary["best_val_loss"] <= transfer["best_val_loss"] + 1e-6
    assert isinstance(summary["kept_phase1_weights"], bool)


def test_metrics_and_plots_show_both_phases(repo: Path) -> None:
    metrics = run(repo, "dvc", "metrics", "show")
    for key in ("transfer.accuracy", "finetune.accuracy", "delta.f1_macro", "best_val_loss"):
        assert key in metrics, key
    run(repo, "dvc", "plots", "show", "-o", "plots_html")
    page = (repo / "plots_html" / "index.html").read_text()
    for name in (
        "train_transfer/history.csv::val_loss",
        "finetune/history.csv::val_loss",
        "Confusion matrix, phase 1 (transfer)",
        "Confusion matrix, phase 2 (fine-tune)",
        "grid_finetune.png",
    ):
        assert name in page, name


def test_same_params_give_byte_identical_metrics(repo: Path) -> None:
    run(repo, "git", "checkout", "-q", "--", ".")
    run(repo, "dvc", "checkout", "-q")
    before = {name: (repo / name).read_bytes() for name in TRACKED_RESULTS}
    for stage in ("train_transfer", "finetune", "evaluate"):
        run(repo, "dvc", "repro", "--force", "--single-item", stage)
    for name, content in before.items():
        after = (repo / name).read_bytes()
        if name.endswith(("train_transfer.json", "finetune.json")):  # these hold wall seconds
            content, after = (_without_wall_seconds(c) for c in (content, after))
        assert after == content, name


def _without_wall_seconds(content: bytes) -> dict:
    summary = json.loads(content)
    summary.pop("wall_seconds")
    return summary


def test_a_killed_stage_leaves_no_partial_output(repo: Path, tmp_path: Path) -> None:
    run(repo, "git", "checkout", "-q", "--", ".")
    run(repo, "dvc", "checkout", "-q")
    history = repo / "plots/finetune/history.csv"
    set_params(repo / "params.yaml", {"finetune": {"epochs": 500, "patience": 500}})
    env = {
        **os.environ,
        "DVC_NO_ANALYTICS": "1",
        "PYTHONUNBUFFERED": "1",  # the epoch lines reach the log as they are printed
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    log = tmp_path / "repro.log"
    with log.open("w") as sink:
        dvc = subprocess.Popen(
            ["dvc", "repro"], cwd=repo, env=env, stdout=sink, stderr=subprocess.STDOUT, text=True
        )
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and dvc.poll() is None:
            if re.search(r"finetune epoch \d+: .*\nfinetune epoch \d+: ", log.read_text()):
                break  # the starting weights and one epoch are done: training is under way
            time.sleep(0.2)
        stage = next(
            p
            for p in psutil.Process(dvc.pid).children(recursive=True)
            if p.name().startswith("python") and "stages/finetune.py" in p.cmdline()
        )
        stage.send_signal(signal.SIGTERM)  # what a batch scheduler sends, mid-epoch
        dvc.wait(timeout=120)
    output = log.read_text()
    assert dvc.returncode != 0
    assert "interrupted; unfinished outputs were removed" in output
    assert not (repo / "models/finetune.pt").exists()
    leftovers = [p.name for p in (repo / "models").iterdir() if ".tmp-" in p.name]
    assert not leftovers
    # DVC removed the last history before the stage ran; the killed stage wrote no partial one
    assert not history.exists(), "the history is written whole, at the stage's end"
    assert "finetune" in run(repo, "dvc", "status")

    set_params(repo / "params.yaml", {"finetune": {"epochs": 2}})  # not in the run-cache
    expected = {"validate", "finetune", "evaluate", "export", "report"}
    assert ran(run(repo, "dvc", "repro")) == expected
    assert (repo / "models/finetune.pt").is_file()
    assert "up to date" in run(repo, "dvc", "status")


def test_a_rejected_param_keeps_the_last_results(repo: Path) -> None:
    """`validate` fails first, so DVC removes no output of the stages that read the param."""
    run(repo, "git", "checkout", "-q", "--", ".")
    run(repo, "dvc", "checkout", "-q")
    kept = [*TRACKED_RESULTS, "models/transfer.pt", "models/finetune.pt"]
    before = {name: (repo / name).read_bytes() for name in kept}
    output = run(repo, "dvc", "exp", "run", "-S", "train_transfer.epochs=abc", check=False)
    assert "train_transfer.epochs" in output and ran(output) == {"validate"}, output[-2000:]
    for name, content in before.items():
        assert (repo / name).read_bytes() == content, name
    run(repo, "git", "checkout", "-q", "--", "params.yaml")
    run(repo, "dvc", "checkout", "-q")  # validate's own marker file comes back from the cache
    assert "up to date" in run(repo, "dvc", "status")


def test_queued_sweep_runs_through_dvc_queue(repo: Path) -> None:
    run(repo, "git", "checkout", "-q", "--", ".")
    run(repo, "dvc", "checkout", "-q")
    run(repo, "dvc", "exp", "run", "--queue", "-S", "finetune.lr=1e-4,3e-4")
    status = run_queue(repo)
    assert status.count("Success") == 2, status
    table = run(repo, "dvc", "exp", "show", "--csv")
    rows = [line for line in table.splitlines() if ",0.0001," in line or ",0.0003," in line]
    assert len(rows) == 2, table


def test_exp_show_view_is_short(repo: Path) -> None:
    output = run(repo, "make", "-s", "exp-show", f"BIN={Path(sys.executable).parent}")
    for column in ("Experiment", "finetune.lr", "transfer.accuracy", "finetune.f1_macro"):
        assert column in output, column
    for noise in ("data/embeddings", "best_val_loss", "precision_macro", "wall_seconds"):
        assert noise not in output, noise


def test_plots_page_renders_offline(repo: Path, tmp_path: Path) -> None:
    run(repo, "dvc", "plots", "show", "-o", "offline_plots")
    page = (repo / "offline_plots" / "index.html").read_text()
    assert "cdn.jsdelivr" not in page and "<script src=" not in page, "no network needed"
    assert "vegaEmbed" in page
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (.ci/run installs it)")
    dom = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--virtual-time-budget=10000",
            "--dump-dom",
            (repo / "offline_plots" / "index.html").as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    # loss, accuracy and two confusion matrices: each a drawn Vega chart
    assert dom.count('class="marks"') >= 4, dom[:2000]


def test_plots_diff_overlays_two_experiments(repo: Path) -> None:
    listed = run(repo, "dvc", "exp", "ls", "--name-only").split()
    experiments = [name for name in listed if not name.endswith(":")][:2]
    assert len(experiments) == 2, listed
    run(repo, "dvc", "plots", "diff", *experiments, "-o", "diff_plots")
    page = (repo / "diff_plots" / "index.html").read_text()
    for name in experiments:
        assert name in page, name
    assert "cdn.jsdelivr" not in page


def test_metrics_diff_between_phases(repo: Path) -> None:
    run(repo, "git", "checkout", "-q", "--", ".")
    run(repo, "dvc", "checkout", "-q")
    params = (repo / "params.yaml").read_text()
    run(repo, "dvc", "exp", "run", "--temp", "-n", "phase1-only", "-S", "finetune.epochs=0")
    assert (repo / "params.yaml").read_text() == params, "the README's flow leaves no trap"
    diff = run(repo, "dvc", "metrics", "diff", "phase1-only", "HEAD", "--md")
    assert "finetune.accuracy" in diff and "transfer.accuracy" not in diff
    run(repo, "dvc", "exp", "apply", "phase1-only")
    evaluation = json.loads((repo / "metrics/evaluate.json").read_text())
    assert evaluation["finetune"] == evaluation["transfer"]
    assert json.loads((repo / "metrics/finetune.json").read_text())["skipped"] is True
    assert "**Phase 2 was skipped**" in (repo / "plots/report.md").read_text()
    run(repo, "git", "checkout", "-q", "--", ".")
    run(repo, "dvc", "checkout", "-q")


def test_a_non_resnet_family_runs_the_whole_dag_in_a_temp_experiment(repo: Path) -> None:
    """resnet18 is the module's own run; every family runs the chain in-process in
    tests/test_families.py; this proves the dvc.yaml path for another one (timm's, optional)."""
    arch = "timm/convnext_atto"
    name = "arch-" + re.sub(r"[_/]", "-", arch)
    output = run(
        repo,
        "dvc",
        "exp",
        "run",
        "--temp",
        "-n",
        name,
        "-S",
        f"model.arch={arch}",
        "-S",
        "data.image_size=32",
    )
    assert {"features", "train_transfer", "finetune", "evaluate"} <= ran(output), output[-2000:]
    table = run(repo, "dvc", "exp", "show", "--csv", "--keep", "finetune.accuracy")
    row = next(line for line in table.splitlines() if line.startswith(f"{name},"))
    assert re.search(r",0\.\d+", row), row


def test_a_recipe_runs_as_a_dvc_experiment(repo: Path) -> None:
    """The linear-probe recipe's overrides through `dvc exp run -S` (what `make recipe` does)."""
    from scripts.recipe import recipe_args

    args = recipe_args(PROJECT / "recipes" / "linear-probe.yaml")
    output = run(repo, "dvc", "exp", "run", "--temp", "-n", "probe", *args)
    assert {"train_transfer", "finetune", "evaluate", "report"} <= ran(output), output[-2000:]
    assert "linear probe, L2" in output
    table = run(repo, "dvc", "exp", "show", "--csv")
    row = next(line for line in table.splitlines() if line.startswith("probe,"))
    assert ",lbfgs," in row and ",[]," in row, row
