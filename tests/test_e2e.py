"""The real thing: `dvc repro` and `dvc exp run` in a temporary git repo, on offline digits:
which stages a change reruns, what a rerun keeps, a killed stage, a rejected param."""

from __future__ import annotations

import functools
import json
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.dvc_project import REAL_DVC, STAGES, digits_project, dvc_env, ran, run, set_params

pytestmark = pytest.mark.e2e

TRACKED_RESULTS = (
    "metrics/train_transfer.json",
    "metrics/finetune.json",
    "metrics/evaluate.json",
    "plots/train_transfer/history.csv",
    "plots/finetune/history.csv",
    "plots/evaluate/predictions_finetune.csv",
)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return digits_project(tmp_path_factory, "project")


def test_repro_writes_every_declared_output(repo: Path) -> None:
    evaluation = json.loads((repo / "metrics/evaluate.json").read_text())
    assert set(evaluation) == {"test_images", "transfer", "finetune", "delta", "most_confused"}
    assert set(evaluation["most_confused"]) == {"transfer", "finetune"}
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


# What a param reaches: the stages DVC's status finds changed, and every stage downstream of them
# but validate (it checks the params and writes the same marker for any valid value: see
# test_speed_only_params_rerun_nothing). Each phase's results change with its LR, so everything
# below a changed stage reruns; test_queued_sweep_runs_through_dvc_queue shows the same set for
# finetune.lr in a real run's log, and the other tests here run what only a run can show.
REACHES = {
    "finetune.lr=3e-5": {"validate", "finetune", "evaluate", "export", "report"},
    "train_transfer.lr=0.002": {
        "validate",
        "train_transfer",
        "finetune",
        "evaluate",
        "export",
        "report",
    },
    "data.val_ratio=0.25": set(STAGES) - {"download", "index"},
}


@pytest.mark.parametrize("change", REACHES)
def test_a_param_change_reruns_exactly_its_stages_and_below(repo: Path, change: str) -> None:
    run(repo, "git", "checkout", "-q", "--", ".")
    assert reached_by(repo, change) == REACHES[change]


def reached_by(repo: Path, change: str) -> set[str]:
    """The stages `dvc repro` would run after `change` (`section.key=number`), from DVC's status
    and DAG; params.yaml is left as it was."""
    key, value = change.split("=")
    section, name = key.split(".")
    before = (repo / "params.yaml").read_text()
    set_params(repo / "params.yaml", {section: {name: float(value)}})
    try:
        changed = set(json.loads(run(repo, "dvc", "status", "--json")))
    finally:
        (repo / "params.yaml").write_text(before)
    edges = dag_edges(repo)
    reached = set(changed)
    frontier = changed - {"validate"}
    while frontier:
        frontier = {child for parent, child in edges if parent in frontier} - reached
        reached |= frontier
    return reached


@functools.cache
def dag_edges(repo: Path) -> list[tuple[str, str]]:
    """`dvc dag`'s edges (parent, child), asked once per repo: only `data.root` moves a path in
    dvc.yaml, and no test here changes it."""
    return re.findall(r'"(\w+)" -> "(\w+)"', run(repo, "dvc", "dag", "--dot"))


def test_unfreeze_recomputes_activations_not_phase_one_and_a_linked_cache_stays_intact(
    repo: Path,
) -> None:
    """finetune.unfreeze moves the cut: features rewrites the activations (and only them),
    phase 1 is skipped. With cache.type hardlink, outputs are links into .dvc/cache; the rerun
    must replace them (new file, rename), never write through a link into the cache."""
    import hashlib

    run(repo, "git", "checkout", "-q", "--", ".")
    run(repo, "dvc", "config", "--local", "cache.type", "hardlink")
    try:
        run(repo, "dvc", "checkout", "-q", "--relink")
        assert (repo / "data/activations/train_activations.npy").stat().st_nlink == 2
        embeddings = (repo / "data/embeddings/train_embeddings.npy").read_bytes()
        output = run(repo, "dvc", "exp", "run", "-S", "finetune.unfreeze=[layer3,layer4]")
        assert ran(output) == {"validate", "features", "finetune", "evaluate", "export", "report"}
        assert "Stage 'train_transfer' didn't change, skipping" in output
        assert (repo / "data/embeddings/train_embeddings.npy").read_bytes() == embeddings
        assert json.loads((repo / "data/activations/meta.json").read_text())["cut"] == "layer3"
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


def test_augmented_views_and_streamed_phase_two_through_dvc(repo: Path) -> None:
    run(repo, "git", "checkout", "-q", "--", ".")
    run(repo, "dvc", "checkout", "-q")
    output = run(repo, "dvc", "exp", "run", "-S", "features.views=2", "-S", "finetune.input=images")
    assert ran(output) == set(STAGES) - {"download", "index", "split"}, output[-2000:]
    assert (repo / "data/embeddings/train_views_embeddings.npy").is_file()
    assert not (repo / "data/activations/train_activations.npy").exists()
    assert (repo / "data/activations/test_activations.npy").is_file()
    # the views are cached once: phase 1's LR reruns phase 1 and below, not the features
    reached = reached_by(repo, "train_transfer.lr=0.004")
    assert reached == REACHES["train_transfer.lr=0.002"] and "features" not in reached
    run(repo, "git", "checkout", "-q", "--", ".")
    run(repo, "dvc", "checkout", "-q")


def test_tta_reruns_the_features_and_evaluate_never_the_phases(repo: Path) -> None:
    """evaluate.tta: flip adds data/tta and leaves the phases' inputs byte for byte as they were,
    so neither phase reruns; the plain scores stay, the TTA ones join them; a later change of
    a phase reruns no trunk."""
    run(repo, "git", "checkout", "-q", "--", ".")
    run(repo, "dvc", "checkout", "-q")
    inputs = [p for name in ("embeddings", "activations") for p in (repo / "data" / name).iterdir()]
    before = {path: path.read_bytes() for path in inputs}
    plain = json.loads((repo / "metrics/evaluate.json").read_text())
    try:
        output = run(repo, "dvc", "exp", "run", "-S", "evaluate.tta=flip")
        assert ran(output) == {"validate", "features", "evaluate", "report"}, output[-2000:]
        for phase in ("train_transfer", "finetune", "export"):
            assert f"Stage '{phase}' didn't change, skipping" in output, phase
        for path, content in before.items():
            assert path.read_bytes() == content, path
        assert (repo / "data/tta/test_flip_embeddings.npy").is_file()
        assert (repo / "data/tta/test_flip_activations.npy").is_file()
        evaluation = json.loads((repo / "metrics/evaluate.json").read_text())
        for key in ("test_images", "transfer", "finetune", "delta"):
            assert evaluation[key] == plain[key], key
        assert {"transfer_tta", "finetune_tta", "delta_tta"} <= set(evaluation)
        assert "accuracy (TTA)" in (repo / "plots/report.md").read_text()
        assert reached_by(repo, "finetune.lr=3e-5") == REACHES["finetune.lr=3e-5"]
    finally:
        run(repo, "git", "checkout", "-q", "--", ".")
        # the TTA predictions in plots/evaluate (git-tracked, not DVC-cached) are new files
        run(repo, "git", "clean", "-fdq", "--", "plots", "metrics")
        run(repo, "dvc", "checkout", "-q")


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


def test_same_params_give_byte_identical_metrics(repo: Path) -> None:
    run(repo, "git", "checkout", "-q", "--", ".")
    run(repo, "dvc", "checkout", "-q")
    before = {name: (repo / name).read_bytes() for name in TRACKED_RESULTS}
    # the real python: a fresh interpreter (its own hash seed) for each stage, as a user's rerun;
    # the committed results came from children of the fork server
    stages = ("train_transfer", "finetune", "evaluate")
    output = run(repo, "dvc", "repro", "--force", "--single-item", *stages, plain=True)
    assert ran(output) == set(stages), output[-2000:]
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
    # the epoch lines reach the log as they are printed
    env = {**dvc_env(), "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "repro.log"
    with log.open("w") as sink:
        dvc = subprocess.Popen(  # the real dvc: the stage is among its own descendants
            [REAL_DVC, "repro"], cwd=repo, env=env, stdout=sink, stderr=subprocess.STDOUT, text=True
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
