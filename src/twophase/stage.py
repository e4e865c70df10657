"""What every DVC stage script shares: clean one-line failures, and clean interruptions."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Callable
from types import FrameType

from twophase.errors import TwophaseError
from twophase.params import ComputeParams, load_params


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def torchrun_command(compute: ComputeParams, script: str) -> list[str]:
    """The command that runs `script` in `compute.processes` processes under torchrun."""
    launcher = shlex.split(compute.launcher)
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    if compute.nnodes == 1:
        torchrun += ["--standalone", f"--nproc-per-node={compute.nproc}"]
    else:
        torchrun += [
            f"--nnodes={compute.nnodes}",
            f"--nproc-per-node={compute.nproc}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={compute.rdzv_endpoint}",
            "--rdzv-id=twophase",
        ]
    return [*launcher, *torchrun, script]


def run_stage(
    main: Callable[[], None], batch_size_param: str | None = None, distributed: bool = False
) -> None:
    """Run a stage's main(); a TwophaseError exits 1 with its message, not a traceback.

    A `distributed` stage relaunches itself under torchrun when `compute` asks for several
    processes (params.yaml is validated first, so a wrong param fails in one line here).

    SIGTERM is turned into KeyboardInterrupt like SIGINT, so the temporary outputs being written
    are deleted on the way out (see io.atomic_path) and no half-written file reaches its path.
    Running out of GPU memory names the `batch_size_param` to lower.
    """
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        if distributed and "LOCAL_RANK" not in os.environ:
            compute = load_params().compute
            if compute.processes > 1:
                sys.exit(_relaunch(torchrun_command(compute, sys.argv[0])))
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


def _relaunch(command: list[str]) -> int:
    """Run the stage again as `command`; an interruption is passed on and waited for, so the
    ranks remove their unfinished outputs before this process exits."""
    sys.stdout.flush()
    launched = subprocess.Popen(command)
    try:
        return launched.wait()
    except KeyboardInterrupt:
        launched.send_signal(signal.SIGTERM)
        launched.wait()
        raise


def _fail(message: str) -> None:
    sys.stdout.flush()
    print(f"twophase: error: {message}", file=sys.stderr)
    sys.exit(1)
