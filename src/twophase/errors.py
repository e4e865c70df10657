"""The project's own error type: anything the user can fix, said in one line; and the one line
said for the system's own faults (a full disk, a vanished file)."""

from __future__ import annotations

import errno
import os
from pathlib import Path


class TwophaseError(Exception):
    """A problem with params, data, weights or training that the message tells how to fix."""


DEBUG_VARIABLE = "TWOPHASE_DEBUG"  # set it to see the traceback behind a one-line fault


def debugging() -> bool:
    return bool(os.environ.get(DEBUG_VARIABLE))


def last_line(err: BaseException) -> str:
    """The line that says what went wrong: the last of the message (a DataLoader worker's error
    ends with the original one), or the type's name."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1][:200] if lines else type(err).__name__


def fault_line(err: BaseException) -> str | None:
    """One line for a fault of the system rather than of the code, or None for anything else:
    a full disk, a file-size limit, a file that vanished or cannot be read."""
    if isinstance(err, OSError):
        where = f" ({err.filename})" if err.filename else ""
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            return (
                f"no space left on the device{where}: free some space (the feature cache and "
                "DVC's copy of it in .dvc/cache are the largest outputs) and rerun"
            )
        if err.errno == errno.EFBIG:
            return f"a file outgrew the file-size limit{where} (ulimit -f, or the file system's)"
        if err.errno == errno.ENOENT:
            return f"no such file{where}: was it moved or deleted since it was indexed? rerun"
        return f"{err.strerror or last_line(err)}{where}"
    message = str(err)
    if isinstance(err, RuntimeError) and (
        "PytorchStreamWriter" in message or "unexpected pos" in message
    ):
        return (
            "a checkpoint could not be written: the disk is full or a file-size limit was hit; "
            "free some space and rerun"
        )
    return None


def first_few(items: list[str], count: int = 3, separator: str = ", ") -> str:
    """The first `count` items, then how many more."""
    more = f"{separator}... and {len(items) - count} more" if len(items) > count else ""
    return separator.join(items[:count]) + more


def copied_run_hint(root: Path) -> str:
    """`dvc exp run --temp` and queued runs work in a copy holding only what git tracks."""
    if root.is_absolute() or "/.dvc/tmp/exps/" not in Path.cwd().as_posix() + "/":
        return ""
    return (
        "; this --temp or queued experiment runs in a copy of what git tracks, without your "
        "images: set data.root to their absolute path outside the repository, or run without "
        "--temp/--queue"
    )
