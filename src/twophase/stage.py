"""What every DVC stage script shares: clean one-line failures, and clean interruptions."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from types import FrameType

from twophase.errors import TwophaseError


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def run_stage(main: Callable[[], None], batch_size_param: str | None = None) -> None:
    """Run a stage's main(); a TwophaseError exits 1 with its message, not a traceback.

    SIGTERM is turned into KeyboardInterrupt like SIGINT, so the temporary outputs being written
    are deleted on the way out (see io.atomic_path) and no half-written file reaches its path.
    Running out of GPU memory names the `batch_size_param` to lower.
    """
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        main()
    except TwophaseError as err:
        _fail(str(err))
    except Exception as err:
        if type(err).__name__ != "OutOfMemoryError":  # torch.cuda's; torch is not imported here
            raise
        lower = f"lower {batch_size_param}" if batch_size_param else "use a smaller batch"
        _fail(f"the GPU ran out of memory ({str(err).splitlines()[0][:100]}); {lower} and rerun")
    except KeyboardInterrupt:
        sys.stdout.flush()
        print("twophase: interrupted; unfinished outputs were removed", file=sys.stderr)
        sys.exit(130)


def _fail(message: str) -> None:
    sys.stdout.flush()
    print(f"twophase: error: {message}", file=sys.stderr)
    sys.exit(1)
