"""Regenerate the docs' example outputs from a real run of the committed code.

    python scripts/readme_examples.py          # about 2 minutes on a 2-core CPU

In a fresh clone of HEAD (in a temporary folder), it runs the flow of docs/experiments.md:
`make digits`, `dvc exp apply`, `git add dvc.lock metrics plots`, a phase-1-only experiment
(which must not train phase 1 again), the narrow `dvc exp show` view and `dvc metrics diff`;
then it rewrites the blocks of docs/experiments.md between `<!-- example:NAME -->` and
`<!-- /example -->`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

PROJECT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
EXAMPLES = PROJECT / "docs" / "experiments.md"
# The narrow view docs/experiments.md shows: both phases' test accuracy, the delta, finetune's lr
# and epochs (make exp-show keeps more columns than a page's width).
NARROW = r"^Experiment$|^(transfer|finetune|delta)\.accuracy$|^finetune\.(lr|epochs)$"


def sh(repo: Path, *args: str) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, check=True)
    return done.stdout


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "twophase"
        subprocess.run(["git", "clone", "-q", str(PROJECT), str(repo)], check=True)
        sh(repo, "git", "checkout", "-q", "-B", "main")
        out = sh(repo, "make", "-s", "digits", f"BIN={BIN}")
        name = re.search(r"Ran experiment\(s\): (\S+)", out)
        if name is None:
            raise SystemExit(f"make digits named no experiment:\n{out}")
        digits = name.group(1)
        sh(repo, "dvc", "exp", "apply", digits)
        sh(repo, "git", "add", "dvc.lock", "metrics", "plots")
        epochs = "finetune.epochs=0"
        run = sh(repo, "dvc", "exp", "run", "--temp", "-n", "phase1-only", "-S", epochs)
        if "Running stage 'train_transfer'" in run:
            raise SystemExit(f"the phase-1-only run trained phase 1 again:\n{run}")
        if yaml.safe_load((repo / "params.yaml").read_text())["finetune"]["epochs"] == 0:
            raise SystemExit("the phase-1-only run left finetune.epochs: 0 in the workspace")
        examples = {
            "exp-show": sh(repo, "dvc", "exp", "show", "--drop", ".*", "--keep", NARROW),
            "metrics-diff": sh(repo, "dvc", "metrics", "diff", "phase1-only", digits, "--md"),
        }
    readme = EXAMPLES.read_text(encoding="utf-8")
    for key, text in examples.items():
        text = "\n".join(line.rstrip() for line in text.strip("\n").splitlines())
        pattern = re.compile(rf"(<!-- example:{key} -->\n```\n).*?(```\n<!-- /example -->)", re.S)
        readme, found = pattern.subn(lambda m, t=text: m.group(1) + t + "\n" + m.group(2), readme)
        if not found:
            raise SystemExit(f"{EXAMPLES.name} has no <!-- example:{key} --> block")
    EXAMPLES.write_text(readme, encoding="utf-8")
    print(f"{EXAMPLES.relative_to(PROJECT)} examples regenerated (digits experiment {digits})")


if __name__ == "__main__":
    main()
