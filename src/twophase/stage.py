"""What every DVC stage script shares: clean one-line failures, and clean interruptions."""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import IO, Any

import yaml

from twophase.errors import TwophaseError, debugging, fault_line
from twophase.io import remove_output, remove_stale_temporaries
from twophase.params import ComputeParams, Params, ParamsError, flatten, load_params, read_yaml

PARAMS_FILE, DVC_YAML = Path("params.yaml"), Path("dvc.yaml")


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
    Running out of GPU memory names the `batch_size_param` to lower. A stage whose declared
    params changed in params.yaml while it ran fails (see ParamsGuard).
    """
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        guard = None if "LOCAL_RANK" in os.environ else ParamsGuard(Path(sys.argv[0]).stem)
        if distributed and guard is not None:
            params = load_params()
            compute = params.compute
            if compute.processes > 1:
                check_gpus(compute.nproc, params.device)
                code = _relaunch(torchrun_command(compute, sys.argv[0]))
                if code:
                    sys.exit(code)
                guard.check()
                return
        main()
        if guard is not None:
            guard.check()
    except TwophaseError as err:
        changed = isinstance(err, ParamsError) and params_file_changed()
        _fail(with_params_hint(str(err)) if changed else str(err))
    except Exception as err:
        fault = None if debugging() else fault_line(err)
        if fault is not None:
            _fail(fault)
        if type(err).__name__ != "OutOfMemoryError":  # torch.cuda's; torch is not imported here
            raise
        lower = f"lower {batch_size_param}" if batch_size_param else "use a smaller batch"
        _fail(f"the GPU ran out of memory ({str(err).splitlines()[0][:100]}); {lower} and rerun")
    except KeyboardInterrupt:
        sys.stdout.flush()
        print("twophase: interrupted; unfinished outputs were removed", file=sys.stderr)
        sys.exit(130)


def check_gpus(nproc: int, device: str) -> None:
    """On GPUs, one process per GPU: more processes than this node has GPUs is a params error,
    said before torchrun starts any of them."""
    if device not in ("auto", "cuda"):
        return
    import torch  # only when several processes are asked for

    gpus = torch.cuda.device_count()
    if (device == "cuda" or gpus > 0) and nproc > gpus:
        raise ParamsError(
            f"compute.nproc: {nproc} processes per node, but this node has {gpus} GPU(s) "
            f"(device: {device}): set compute.nproc to at most {gpus}, or device: cpu"
        )


class ParamsGuard:
    """The values of a stage's params when it started, to compare with those at its end.

    DVC records the params of a stage in dvc.lock when the stage ends, from params.yaml as it is
    then: a `dvc exp run -S` during a `dvc repro` rewrites params.yaml, and the running stage
    would be recorded with values it never used. The stage fails instead, naming what changed,
    so DVC records nothing and reruns it. Only the params dvc.yaml declares for the stage count
    (all of them when dvc.yaml has no such stage; none when it declares none).
    """

    def __init__(self, stage: str) -> None:
        stages = dvc_stages()  # dvc.yaml, read once
        entry = stages.get(stage)
        self.keys = None if entry is None else declared_params(entry)
        self.outs = [] if entry is None else fresh_outputs(entry)
        self.start = self.snapshot()
        # what runs killed with SIGKILL left beside any stage's output: a stage DVC restores
        # from its run-cache never runs itself
        for out in (path for each in stages.values() for path in outputs(each)):
            if out.parent.is_dir():
                remove_stale_temporaries(out)

    def snapshot(self) -> dict[str, Any]:
        try:
            raw = read_yaml(PARAMS_FILE.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):  # unreadable now: compared as changed, or failed already
            return {}
        flat = flatten(raw) if isinstance(raw, dict) else {}
        if self.keys is None:
            return flat
        return {
            key: value
            for key, value in flat.items()
            if any(key == k or key.startswith(f"{k}.") for k in self.keys)
        }

    def check(self) -> None:
        """Fail if a declared param changed; the outputs this run wrote are then removed, as DVC
        removed the last run's before it started: no result stands beside values it was not
        made with."""
        now = self.snapshot()
        changed = [
            key for key in sorted({*self.start, *now}) if self.start.get(key) != now.get(key)
        ]
        if not changed:
            return
        for out in self.outs:
            remove_output(out)
        shown = ", ".join(
            f"{key}: {self.start.get(key)!r} -> {now.get(key)!r}" for key in changed[:3]
        )
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        raise TwophaseError(
            f"{PARAMS_FILE} changed while this stage ran ({shown}{more}); the outputs it made "
            "with the old values were removed and DVC records nothing: rerun (dvc repro) once "
            "params.yaml is as you want it"
        )


def dvc_stages(dvc_yaml: Path = DVC_YAML) -> dict[str, dict[str, Any]]:
    """dvc.yaml's stages by name (none without a readable dvc.yaml here)."""
    try:
        stages = read_yaml(dvc_yaml.read_text(encoding="utf-8"))["stages"]
    except (OSError, yaml.YAMLError, TwophaseError, KeyError, TypeError):
        return {}
    if not isinstance(stages, dict):
        return {}
    return {name: entry for name, entry in stages.items() if isinstance(entry, dict)}


def declared_params(entry: dict[str, Any]) -> list[str]:
    """The params keys (sections or dotted keys) a stage's entry declares from params.yaml."""
    keys: list[str] = []
    for item in entry.get("params") or []:
        if isinstance(item, str):
            keys.append(item)
        elif isinstance(item, dict):  # {other_file.yaml: [keys]}: only params.yaml's count
            keys += [k for file, ks in item.items() if file == str(PARAMS_FILE) for k in ks or []]
    return keys


def outputs(entry: dict[str, Any]) -> dict[Path, bool]:
    """A stage's outputs, each with whether it is `persist: true`."""
    paths = {}
    for item in entry.get("outs") or []:
        name, options = (item, {}) if isinstance(item, str) else next(iter(item.items()))
        paths[Path(name)] = bool((options or {}).get("persist"))
    return paths


def fresh_outputs(entry: dict[str, Any]) -> list[Path]:
    """The outputs DVC removes before the stage runs (all but `persist: true` ones): whatever
    is at those paths when the stage ends, the stage wrote."""
    return [path for path, persist in outputs(entry).items() if not persist]


def _relaunch(command: list[str]) -> int:
    """Run the stage again as `command` (torchrun), in a session of its own so a Ctrl-C reaches
    this process alone. An interruption is passed on as SIGTERM and waited for, so the ranks
    remove their unfinished outputs before this process exits; what torchrun and the ranks
    print while stopping (a traceback each) is not shown: this process says it in one line."""
    sys.stdout.flush()
    launched = subprocess.Popen(
        command, preexec_fn=die_with_parent, start_new_session=True, stderr=subprocess.PIPE
    )
    stopping = threading.Event()
    forwarding = threading.Thread(target=_forward, args=(launched.stderr, stopping), daemon=True)
    forwarding.start()
    try:
        code = launched.wait()
    except KeyboardInterrupt:
        stopping.set()
        launched.send_signal(signal.SIGTERM)
        launched.wait()
        raise
    forwarding.join()
    return code


def _forward(stream: IO[bytes] | None, stopping: threading.Event) -> None:
    """Copy the ranks' stderr to this process's, line by line, until the stage is stopping."""
    if stream is None:
        return
    for line in stream:
        if not stopping.is_set():
            sys.stderr.buffer.write(line)
            sys.stderr.flush()


SECTIONS = tuple(field.name for field in dataclasses.fields(Params))  # seed, data, model, ...
PARAM_ERROR = re.compile(rf"^({'|'.join(SECTIONS)})(\.\w+)*: ")


def with_params_hint(message: str) -> str:
    """An error about a param's value also says that the value stays in params.yaml: `dvc exp
    run -S` writes it there before running, so every later run fails the same way until the
    file is corrected."""
    if not PARAM_ERROR.match(message):
        return message
    return (
        f"{message} (this value now stands in params.yaml, where `dvc exp run -S` wrote it: "
        "correct it there, or undo with `git checkout params.yaml`)"
    )


def die_with_parent() -> None:
    """In a child process (Linux): receive SIGTERM when the parent dies, even by SIGKILL, so a
    killed stage leaves no torchrun and no ranks writing outputs DVC has declared failed."""
    if sys.platform != "linux":
        return
    import ctypes  # only in the child, between fork and exec

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def params_file_changed() -> bool:
    """Whether params.yaml differs from git's HEAD (False where git cannot tell)."""
    try:
        done = subprocess.run(
            ["git", "status", "--porcelain", "--", str(PARAMS_FILE)], capture_output=True
        )
    except OSError:
        return False
    return done.returncode == 0 and bool(done.stdout.strip())


def _fail(message: str) -> None:
    sys.stdout.flush()
    print(f"twophase: error: {message}", file=sys.stderr)
    sys.exit(1)
