"""The README is a front page and the manual a site: the site builds with --strict (no broken
link or anchor), every page is in its navigation, and the README stays short."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from tests.helpers import PROJECT

README_MAX_BYTES = 10_500


def nav_pages(nav: list[object]) -> set[str]:
    pages: set[str] = set()
    for entry in nav:
        target = next(iter(entry.values())) if isinstance(entry, dict) else entry
        pages |= nav_pages(target) if isinstance(target, list) else {str(target)}
    return pages


def test_the_site_builds_strict(tmp_path: Path) -> None:
    mkdocs = Path(sys.executable).parent / "mkdocs"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run(
        [str(mkdocs), "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=PROJECT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site" / "index.html").is_file()


def test_every_docs_page_is_in_the_nav() -> None:
    config = yaml.safe_load((PROJECT / "mkdocs.yml").read_text())
    docs = PROJECT / config["docs_dir"]
    pages = {str(p.relative_to(docs)) for p in docs.rglob("*.md")}
    assert pages == nav_pages(config["nav"])


def test_the_readme_is_a_front_page() -> None:
    readme = PROJECT / "README.md"
    assert readme.stat().st_size <= README_MAX_BYTES
    text = readme.read_text()
    for command in ("make setup", "make digits", "make test"):
        assert command in text, command
    links = re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text)  # relative links: they work on GitHub
    assert links and all((PROJECT / link).is_file() for link in links), links


def test_the_example_outputs_show_the_command_the_docs_give() -> None:
    from scripts.readme_examples import EXAMPLES, NARROW

    text = EXAMPLES.read_text()
    assert f"dvc exp show --drop '.*' --keep '{NARROW}'" in text
    for key in ("exp-show", "metrics-diff"):
        assert f"<!-- example:{key} -->\n```\n" in text, key
