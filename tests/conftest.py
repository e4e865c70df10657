"""Shared fixtures."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from tests.helpers import make_imagefolder

os.environ["DVC_NO_ANALYTICS"] = "1"
# Under pytest-xdist (make test), the cores are shared among the workers, and the stages the
# end-to-end tests start inherit the same share: no worker's threads wait on another's.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    _share = max(1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(_share)

# The longest files first, roughly longest to shortest (--dist loadfile hands a worker the next
# file as it runs out), the rest as workers free up. The second needs no digits project: its
# worker does not wait while the first builds it (tests/dvc_project.py).
LONGEST_FIRST = (
    "test_e2e.py",
    "test_e2e_data.py",
    "test_e2e_experiments.py",
    "test_families.py",
    "test_e2e_team.py",
    "test_distributed.py",
)


@pytest.fixture
def imagefolder(tmp_path: Path) -> Path:
    return make_imagefolder(tmp_path / "folder")


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to reach the network fails at once, as on an offline node (unit tests only:
    the end-to-end tests' subprocesses see this machine's real network, which is offline here)."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: each file keeps its own order
