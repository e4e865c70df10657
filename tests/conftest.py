"""Shared fixtures."""

from __future__ import annotations

import os
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
