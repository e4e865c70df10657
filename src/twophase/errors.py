"""The project's own error type: anything the user can fix, said in one line; and the one line
said for the system's own faults (a full disk, a vanished file)."""

from __future__ import annotations

import errno
import os


class TwophaseError(Exception):
    """A problem with params, data, weights or training that the message tells how to fix."""


DEBUG_VARIABLE = "TWOPHASE_DEBUG"  # set it to see the traceback behind a one-line fault


def debugging() -> bool:
    return bool(os.environ.get(DEBUG_VARIABLE))


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
        return f"{err.strerror or type(err).__name__}{where}"
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
