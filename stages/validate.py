"""DVC stage `validate`: every key of params.yaml checked before a stage that computes runs.

Every other stage is downstream of this one, and it depends on every section of params.yaml,
so DVC runs it first whenever a param changes: a rejected value (`dvc exp run -S
train_transfer.epochs=abc`) fails here, before DVC removes the last outputs of the stages that
read it. Its output never changes, so passing reruns nothing downstream.
"""

from pathlib import Path

import _src_path  # noqa: F401

from twophase.io import atomic_path
from twophase.params import ParamsError, load_params
from twophase.stage import run_stage

CHECKED = Path("data/params.checked")


def main() -> None:
    params = load_params()
    root = Path(params.data.root)
    if not root.exists():  # DVC would stop on the missing dependency, naming no param
        raise ParamsError(
            f"data.root: {str(root)!r} does not exist (the download, index and features stages "
            "depend on it; the default data/raw is the folder for your own images)"
        )
    with atomic_path(CHECKED) as tmp:
        tmp.write_text("params.yaml passed validation\n", encoding="utf-8")
    print("params.yaml: every key valid")


if __name__ == "__main__":
    run_stage(main)
