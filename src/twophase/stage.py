"""What every DVC stage script shares: clean one-line failures for problems the user can fix."""

from __future__ import annotations

import sys
from collections.abc import Callable

from twophase.errors import TwophaseError


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's main(); a TwophaseError exits 1 with its message, not a traceback."""
    try:
        main()
    except TwophaseError as err:
        sys.stdout.flush()
        print(f"twophase: error: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("twophase: interrupted; no partial outputs were kept", file=sys.stderr)
        sys.exit(130)
