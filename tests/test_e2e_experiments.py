"""Experiments as users run them through real `dvc`, on offline digits: a queued sweep, `exp show`,
plots and their diff, metrics diff between phases, a temp experiment of another family, a recipe,
and two processes under torchrun."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.dvc_project import TINY_DIGITS, digits_project, ran, run, run_queue, set_params
from tests.helpers import PROJECT

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return digits_project(tmp_path_factory, "experiments")


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


def test_queued_sweep_runs_through_dvc_queue(repo: Path) -> None:
    """Two finetune.lr values, queued and run; each run's log shows that the change reran
    finetune and below, and skipped everything above."""
    run(repo, "git", "checkout", "-q", "--", ".")
    run(repo, "dvc", "checkout", "-q")
    run(repo, "dvc", "exp", "run", "--queue", "-S", "finetune.lr=1e-4,3e-4")
    status = run_queue(repo)
    assert status.count("Success") == 2, status
    table = run(repo, "dvc", "exp", "show", "--csv")
    rows = [line for line in table.splitlines() if ",0.0001," in line or ",0.0003," in line]
    assert len(rows) == 2, table
    for task in re.findall(r"^(\w+)\s.*\bSuccess\b", status, flags=re.MULTILINE):
        log = run(repo, "dvc", "queue", "logs", task)
        assert ran(log) == {"validate", "finetune", "evaluate", "export", "report"}, log[-3000:]
        for stage in ("download", "index", "split", "features", "train_transfer"):
            assert f"Stage '{stage}' didn't change, skipping" in log, (stage, log[-3000:])


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
