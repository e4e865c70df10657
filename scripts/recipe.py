"""Print a recipe's `dvc exp run` arguments: `-S key=value` for each of its params.

    dvc exp run -n recipe-strong $(python scripts/recipe.py recipes/strong.yaml)
    make recipe R=strong        # the same
    make recipe                 # lists the recipes (python scripts/recipe.py --list)

A recipe is a YAML file with a one-line `purpose` and `params` (dotted keys as `-S` takes them).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

import yaml


def recipe_args(path: Path) -> list[str]:
    recipe = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(recipe, dict) or not isinstance(recipe.get("params"), dict):
        raise SystemExit(f"{path}: a recipe needs `purpose:` and a `params:` mapping")
    args = []
    for key, value in recipe["params"].items():
        args += ["-S", f"{key}={value}"]
    return args


def list_recipes(out: TextIO) -> None:
    for path in sorted(Path("recipes").glob("*.yaml")):
        purpose = yaml.safe_load(path.read_text(encoding="utf-8")).get("purpose", "")
        print(f"{path.stem:14s} {purpose}", file=out)


def main() -> None:
    if sys.argv[1:] == ["--list"]:  # `make recipe` without R=: the list is the answer
        list_recipes(sys.stdout)
        return
    if len(sys.argv) != 2 or not Path(sys.argv[1]).is_file():
        list_recipes(sys.stderr)
        raise SystemExit("usage: python scripts/recipe.py recipes/<name>.yaml")
    args = recipe_args(Path(sys.argv[1]))
    if any(char.isspace() for arg in args for char in arg):
        raise SystemExit(f"{sys.argv[1]}: values with spaces cannot be passed through the shell")
    print(" ".join(args))  # word-split by the caller's shell (the Makefile disables globbing)


if __name__ == "__main__":
    main()
