"""Writing outputs so that a killed stage never leaves a half-written file for DVC to cache."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twophase.errors import TwophaseError

if TYPE_CHECKING:  # pandas: only for type hints, the training stages never import it
    import pandas as pd


class OutputIsFolderError(TwophaseError):
    """An output path names an existing folder, which a file must never replace."""


@contextmanager
def atomic_path(path: Path, folder: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; on success rename it onto `path`, else delete it.

    Whatever the caller creates at the yielded path replaces `path` in one rename, on the same
    file system. An existing folder at `path` is replaced only when `folder` is set (a stage's
    own output folder); otherwise it is refused before anything is written, so a user's folder
    named as an output file is never removed.
    """
    path = Path(path)
    _refuse_folder(path, folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        _refuse_folder(path, folder)  # a folder may have appeared there meanwhile
        if path.is_dir() and not path.is_symlink():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            path.rename(old)
            tmp.rename(path)
            remove_output(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        remove_output(tmp)
        raise


def _refuse_folder(path: Path, folder: bool) -> None:
    if not folder and path.is_dir():
        raise OutputIsFolderError(f"{str(path)!r} is a folder: give the path of a file to write")


def remove_stale_temporaries(path: Path) -> None:
    """Remove the `.NAME.tmp-PID` / `.NAME.old-PID` siblings of `path` that a killed run left
    (SIGKILL, before or between the two renames): only those whose process no longer runs."""
    for pattern in (f".{path.name}.tmp-*", f".{path.name}.old-*"):
        for stale in path.parent.glob(pattern):
            pid = stale.name.rpartition("-")[2]
            if pid.isdigit() and not _running(int(pid)):
                remove_output(stale)


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process starts no output twice at once: a leftover of an earlier run
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_output(path: Path) -> None:
    """Remove a file or folder this project wrote (never called on anything else)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_json(data: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_csv(frame: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
