"""The end-to-end tests' DVC project: the repository's files in a temporary git repo, run by the
real `dvc` on offline data; and the tiny digits project, reproduced once per test session and
copied for each end-to-end file (pytest-xdist's workers share it)."""

from __future__ import annotations

import atexit
import fcntl
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

import psutil
import pytest
import yaml

from tests import stage_server
from tests.helpers import PROJECT
from twophase.params import Params, read_yaml, to_dict

TINY_DIGITS = {
    "data": {"dataset": "digits", "image_size": 16},
    "model": {"weights": "none"},
    "features": {"num_workers": 0},
    "train_transfer": {"lr": 0.003, "epochs": 3},
    "finetune": {"epochs": 1},
}
STAGES = tuple(yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"])
GIT_USER = ("-c", "user.name=t", "-c", "user.email=t@t")


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


def run(repo: Path, *args: str, check: bool = True, plain: bool = False) -> str:
    """Run a command in `repo`; with `check`, it must succeed, else it must fail. `dvc` and the
    stages it starts run in children of the fork servers (tests/stage_server.py), or with
    `plain` as the real programs."""
    done = subprocess.run(args, cwd=repo, env=dvc_env(plain=plain), capture_output=True, text=True)
    output = done.stdout + done.stderr
    assert (done.returncode == 0) == check, (
        f"{' '.join(args)} exit {done.returncode}:\n{output[-4000:]}"
    )
    return output


def dvc_env(plain: bool = False) -> dict[str, str]:
    """The environment DVC runs in: this venv's tools first on PATH, and before them the fork
    servers' `python` and `dvc` unless `plain`."""
    folders = [str(Path(sys.executable).parent), os.environ["PATH"]]
    if not plain:
        folders.insert(0, _served_commands())
    return {**os.environ, "DVC_NO_ANALYTICS": "1", "PATH": os.pathsep.join(folders)}


REAL_DVC = str(Path(sys.executable).parent / "dvc")  # the venv's own, never a fork server's
_SERVED: list[str] = []


def _served_commands() -> str:
    """The folder of the fork servers' `python` and `dvc`; the servers start on the first call
    in this process and stop when it exits."""
    if not _SERVED:
        folder = tempfile.mkdtemp(prefix="stage-server-")
        server_env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
        servers: list[tuple[subprocess.Popen, IO[str], str, str]] = []

        def stop() -> None:
            for server, *_ in servers:
                server.terminate()
            for server, *_ in servers:
                server.wait(timeout=30)
            shutil.rmtree(folder, ignore_errors=True)

        atexit.register(stop)  # also when a server fails to start
        for kind in ("python", "dvc"):
            address = os.path.join(folder, f"{kind}.socket")
            log = open(os.path.join(folder, f"{kind}.log"), "w")  # noqa: SIM115 - until exit
            server = subprocess.Popen(
                [sys.executable, str(Path(__file__).with_name("stage_server.py")), address, kind],
                stdout=subprocess.PIPE,
                stderr=log,
                stdin=subprocess.DEVNULL,
                env=server_env,
                text=True,
                # a session of its own, so that no signal to a served process's group reaches
                # pytest (each served process leads a group of its own: stage_server.py)
                start_new_session=True,
            )
            servers.append((server, log, kind, address))
        for server, log, kind, address in servers:  # both import at once, on both cores
            assert server.stdout is not None
            assert server.stdout.readline().strip() == "ready", Path(log.name).read_text()
            stage_server.shim(folder, address, server_env, kind)
        _SERVED.append(folder)
    return _SERVED[0]


def commit(repo: Path, message: str) -> None:
    run(repo, "git", "add", "-A")
    run(repo, "git", *GIT_USER, "commit", "-qm", message, "--allow-empty")


def run_queue(repo: Path, timeout_s: float = 600) -> str:
    """`dvc queue start` one worker, wait until nothing is queued or running; the final status.
    `dvc queue status` (two seconds of a core) is not asked while an experiment of `repo` is
    executing its stages, the longest part of a queued run.

    The worker inherits `dvc queue start`'s streams and looks for more work every 10 s once the
    queue is empty: its output goes to a file, and `dvc queue stop` ends it when the queue is
    done (`--kill` at the deadline); no worker outlives this call."""
    with tempfile.TemporaryFile() as log:
        done = subprocess.run(
            ["dvc", "queue", "start", "-j", "1"],
            cwd=repo,
            env=dvc_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.seek(0)
        assert done.returncode == 0, log.read().decode(errors="replace")[-4000:]
    deadline = time.monotonic() + timeout_s
    stop = ["dvc", "queue", "stop"]
    while time.monotonic() < deadline:
        if not _running_experiment(repo):
            status = run(repo, "dvc", "queue", "status")
            if not re.search(r"\b(Queued|Running)\b", status):
                break
        time.sleep(2)
    else:
        status = run(repo, "dvc", "queue", "status")  # what was still queued or running
        stop.append("--kill")
    workers = _queue_workers(repo)
    run(repo, *stop)
    _, alive = psutil.wait_procs(workers, timeout=60)
    assert not alive, f"a queue worker did not stop: {alive}\n{status}"
    return status


def _queue_workers(repo: Path) -> list[psutil.Process]:
    """The `dvc exp queue-worker` processes started in `repo`."""
    workers = []
    for process in psutil.process_iter(["cmdline", "cwd"]):
        if "queue-worker" in (process.info["cmdline"] or []) and process.info["cwd"] == str(repo):
            workers.append(process)
    return workers


def _running_experiment(repo: Path) -> bool:
    """Whether a `dvc exp exec-run` of `repo`'s queue (one queued experiment) is running."""
    runs = str(repo / ".dvc" / "tmp" / "exps")
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if "exec-run" in cmdline and any(arg.startswith(runs) for arg in cmdline):
            return True
    return False


def ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '(\w+)'", output))


def digits_project(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """A git repo of the project on TINY_DIGITS after a whole `dvc repro`, committed. The first
    caller in the session builds it (under a file lock: xdist workers share the session's
    temporary folder); every caller gets a copy of its own."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if "PYTEST_XDIST_WORKER" in os.environ else base
    template = shared / "digits-template"
    with (shared / "digits-template.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (template / ".git" / "built").exists():
            shutil.rmtree(template, ignore_errors=True)
            template.mkdir()
            copy_project(template, TINY_DIGITS)
            run(template, "git", "init", "-q")
            commit(template, "tiny")
            output = run(template, "dvc", "repro")
            assert ran(output) == set(STAGES), output[-3000:]
            commit(template, "repro")
            (template / ".git" / "built").touch()
    repo = tmp_path_factory.mktemp(name)

    def template_tmp(folder: str, names: list[str]) -> list[str]:
        """.dvc/tmp holds the template's locks and state database: each copy makes its own."""
        return ["tmp"] if Path(folder) == template / ".dvc" else []

    shutil.copytree(template, repo, symlinks=True, dirs_exist_ok=True, ignore=template_tmp)
    return repo
