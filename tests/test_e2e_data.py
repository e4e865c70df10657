"""The user's images are an input. No dvc or git command loses or rewrites them.

One repo, imagefolder data in the repo's own data/raw (git-ignored, DVC reads it as a
dependency), then a root outside the repo for the runs that work in a copy (--temp, --queue).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.dvc_project import GIT_USER, STAGES, copy_project, ran, run, run_queue
from tests.helpers import make_imagefolder, write_image

pytestmark = pytest.mark.e2e

TINY_IMAGEFOLDER = {
    "data": {"dataset": "imagefolder", "root": "data/raw", "image_size": 16, "val_ratio": 0.25},
    "model": {"weights": "none", "dense_units": [8]},
    "features": {"num_workers": 0},
    "train_transfer": {"lr": 0.01, "epochs": 2},
    "finetune": {"epochs": 1},
}


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder`, byte for byte."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def count_test_images(repo: Path) -> int:
    return int(json.loads((repo / "metrics/evaluate.json").read_text())["test_images"])


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("userdata")
    copy_project(repo, TINY_IMAGEFOLDER)
    make_imagefolder(repo / "data/raw", classes=("ant", "bee", "cat"), train=8, test=3)
    run(repo, "git", "init", "-q")
    run(repo, "git", "add", "-A")
    status = run(repo, "git", "status", "--porcelain", "--ignored")
    assert "data/raw/train" not in run(repo, "git", "diff", "--cached", "--name-only"), status
    run(repo, "git", *GIT_USER, "commit", "-qm", "project")
    return repo


def test_repro_reads_the_images_and_leaves_them_alone(repo: Path) -> None:
    before = snapshot(repo / "data/raw")
    # every stage started by the real python, as for a user (the other runs: tests/stage_server.py)
    assert ran(run(repo, "dvc", "repro", plain=True)) == set(STAGES)
    assert snapshot(repo / "data/raw") == before
    assert count_test_images(repo) == 9
    run(repo, "git", "add", "-A")
    assert not run(repo, "git", "status", "--porcelain", "--untracked-files=all", "data", "models")
    run(repo, "git", *GIT_USER, "commit", "-qm", "first run")


def test_adding_an_image_reruns_from_the_index_and_keeps_it(repo: Path) -> None:
    write_image(repo / "data/raw/test/ant/new.jpg", seed=99)
    before = snapshot(repo / "data/raw")
    output = run(repo, "dvc", "exp", "run", "-n", "ten-tests")
    assert {"index", "split", "features", "evaluate"} <= ran(output)
    assert snapshot(repo / "data/raw") == before
    assert count_test_images(repo) == 10
    run(repo, "git", "add", "-A")
    run(repo, "git", *GIT_USER, "commit", "-qm", "ten test images")


def test_changing_and_removing_images_rerun_the_pipeline(repo: Path) -> None:
    committed = snapshot(repo / "data/raw")
    write_image(repo / "data/raw/train/bee/bee_0.jpg", seed=1234)  # new content, same name
    output = run(repo, "dvc", "status")
    assert "index" in output and "features" in output
    (repo / "data/raw/test/ant/new.jpg").unlink()
    before = snapshot(repo / "data/raw")
    assert {"index", "features", "evaluate"} <= ran(run(repo, "dvc", "repro"))
    assert count_test_images(repo) == 9
    assert snapshot(repo / "data/raw") == before
    # the images back as committed: the committed results are theirs again, nothing to rerun
    for name in ("test/ant/new.jpg", "train/bee/bee_0.jpg"):
        (repo / "data/raw" / name).write_bytes(committed[name])
    assert snapshot(repo / "data/raw") == committed
    run(repo, "git", "checkout", "-q", "--", ".")
    run(repo, "dvc", "checkout", "-q")
    assert "up to date" in run(repo, "dvc", "status")
    assert count_test_images(repo) == 10


def test_exp_apply_checkout_and_git_checkout_never_touch_the_images(repo: Path) -> None:
    write_image(repo / "data/raw/train/cat/unrecorded.jpg", seed=7)  # no run has seen it yet
    before = snapshot(repo / "data/raw")
    commands = [
        ("dvc", "exp", "apply", "ten-tests"),
        ("dvc", "checkout"),
        ("git", "checkout", "-q", "--force", "HEAD~1"),  # the first run; exp apply left edits
        ("dvc", "checkout"),
        ("git", "checkout", "-q", "--force", "-"),
        ("dvc", "checkout"),
    ]
    for command in commands:
        run(repo, *command)
        assert snapshot(repo / "data/raw") == before, " ".join(command)
    (repo / "data/raw/train/cat/unrecorded.jpg").unlink()


def test_temp_run_of_an_in_repo_root_fails_in_one_line_and_deletes_nothing(repo: Path) -> None:
    write_image(repo / "data/raw/test/bee/another.jpg", seed=5)
    before = snapshot(repo / "data/raw")
    done = run(repo, "dvc", "exp", "run", "--temp", check=False)
    assert "runs in a copy of what git tracks" in done
    assert "set data.root to their absolute path outside the repository" in done
    assert snapshot(repo / "data/raw") == before
    (repo / "data/raw/test/bee/another.jpg").unlink()


def test_a_root_outside_the_repo_works_with_temp_and_queued_runs(
    repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    outside = tmp_path_factory.mktemp("shared") / "images"
    shutil.copytree(repo / "data/raw", outside, ignore=shutil.ignore_patterns("README.md"))
    before = snapshot(outside)
    in_repo = snapshot(repo / "data/raw")
    run(repo, "dvc", "exp", "run", "-S", f"data.root={outside}")
    assert count_test_images(repo) == 10
    run(repo, "git", "add", "-A")
    run(repo, "git", *GIT_USER, "commit", "-qm", "outside root")

    write_image(outside / "test/cat/extra.jpg", seed=11)
    before = snapshot(outside)
    output = run(repo, "dvc", "exp", "run", "--temp", "-n", "eleven")
    assert {"index", "features"} <= ran(output)
    run(repo, "dvc", "exp", "run", "--queue", "-S", "finetune.lr=0.0003")
    status = run_queue(repo)
    assert "Success" in status and "Failed" not in status, status
    shown = run(repo, "dvc", "exp", "show", "--csv", "--keep", "test_images")
    assert shown.count(",11") >= 2, shown  # both copies saw the new image
    assert snapshot(outside) == before
    assert snapshot(repo / "data/raw") == in_repo
