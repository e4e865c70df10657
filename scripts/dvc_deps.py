"""Rewrite each stage's code dependencies in dvc.yaml from its script's import closure.

    python scripts/dvc_deps.py          # after adding or moving an import; tests/test_dag.py
                                        # fails until dvc.yaml matches

Only the `.py` entries of each stage's `deps:` change; data dependencies keep their order.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from modulefinder import ModuleFinder
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent


def import_closure(script: Path, excludes: Sequence[str] = ()) -> set[str]:
    """Project files `script` imports, transitively (function-level imports included), leaving
    out the modules named in `excludes` (dotted names) and what only they import.

    ModuleFinder searches only stages/ and src/, so third-party packages are never scanned.
    """
    finder = ModuleFinder(path=[str(PROJECT / "stages"), str(PROJECT / "src")], excludes=excludes)
    finder.run_script(str(script))
    files = {Path(m.__file__).resolve() for m in finder.modules.values() if m.__file__}
    return {f.relative_to(PROJECT).as_posix() for f in files if f.is_relative_to(PROJECT)}


def code_deps(stage: str) -> list[str]:
    first = [f"stages/{stage}.py", "stages/_src_path.py"]
    return first + sorted(import_closure(PROJECT / "stages" / f"{stage}.py") - set(first))


def main() -> None:
    lines = (PROJECT / "dvc.yaml").read_text().split("\n")
    out, stage, i = [], None, 0
    while i < len(lines):
        line = lines[i]
        if match := re.match(r"^  (\w+):$", line):
            stage = match.group(1)
        out.append(line)
        i += 1
        if line.strip() == "deps:" and stage:
            deps = []
            while i < len(lines) and lines[i].startswith("      - "):
                deps.append(lines[i][8:])
                i += 1
            data = [d for d in deps if not d.endswith(".py")]
            out += [f"      - {d}" for d in code_deps(stage) + data]
    (PROJECT / "dvc.yaml").write_text("\n".join(out))
    print("dvc.yaml: code dependencies rewritten from the import closures")


if __name__ == "__main__":
    main()
