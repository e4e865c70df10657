"""Shared fixtures."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from tests.helpers import make_imagefolder

os.environ["DVC_NO_ANALYTICS"] = "1"


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
