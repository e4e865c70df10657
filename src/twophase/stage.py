"""What every DVC stage script shares: clean one-line failures, and clean interruptions."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from types import FrameType

from twophase.errors import TwophaseError


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's main(); a TwophaseError exits 1 with its message, not a traceback.

    SIGTERM is turned into KeyboardInterrupt like SIGINT, so the temporary outputs being written
    are deleted on the way out (see io.atomic_path) and no half-written file reaches its path.
    """
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        main()
    except TwophaseError as err:
        sys.stdout.flush()
        print(f"twophase: error: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.stdout.flush()
        print("twophase: interrupted; unfinished outputs were removed", file=sys.stderr)
        sys.exit(130)
