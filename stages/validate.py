"""DVC stage `validate`: every key of params.yaml checked before a stage that computes runs.

Every other stage is downstream of this one, and it depends on every section of params.yaml,
so DVC runs it first whenever a param changes: a rejected value (`dvc exp run -S
train_transfer.epochs=abc`) fails here, before DVC removes the last outputs of the stages that
read it. Its output never changes, so passing reruns nothing downstream. Beyond the schema it
checks what needs a look at the model library: a model.drop_path for an arch without
stochastic depth.
"""

import errno
import os
from pathlib import Path

import _src_path  # noqa: F401

from twophase.errors import copied_run_hint, first_few
from twophase.io import atomic_path
from twophase.params import ParamsError, load_params
from twophase.stage import run_stage

CHECKED = Path("data/params.checked")


def main() -> None:
    params = load_params()
    root = Path(params.data.root)
    if not root.exists():  # DVC would stop on the missing dependency, naming no param
        raise ParamsError(
            f"data.root: {str(root)!r} does not exist (the stages that read images depend on it; "
            f"the default data/raw is the folder for your own images){copied_run_hint(root)}"
        )
    unhashable = unhashable_entries(root)
    if unhashable:
        raise ParamsError(
            f"data.root: {str(root)!r} holds what DVC cannot hash as a dependency "
            f"({first_few(unhashable)}): remove or fix it (twophase would skip it; DVC stops)"
        )
    if params.model.drop_path:  # whether the arch has stochastic depth: the model library says
        from twophase.model import check_drop_path  # torch: imported only for this check

        check_drop_path(params.model.arch, params.model.drop_path)
    with atomic_path(CHECKED) as tmp:
        tmp.write_text("params.yaml passed validation\n", encoding="utf-8")
    print("params.yaml: every key valid")


def unhashable_entries(root: Path) -> list[str]:
    """Dangling symlinks, symlink loops and names that are not UTF-8 under `root`."""
    found = []
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            try:
                name.encode("utf-8")
            except UnicodeEncodeError:
                found.append(f"{str(path)!a}: a name that is not UTF-8")
                continue
            if path.is_symlink():
                try:
                    path.stat()
                except FileNotFoundError:
                    found.append(f"{path}: a symlink to nothing")
                except OSError as err:
                    what = "a symlink loop" if err.errno == errno.ELOOP else err.strerror
                    found.append(f"{path}: {what}")
    return found


if __name__ == "__main__":
    run_stage(main)
