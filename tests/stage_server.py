"""Fork servers for the end-to-end tests' stage processes and `dvc` commands.

Every DVC stage is `python stages/<stage>.py`, and most of a stage's time on tiny data is spent
importing torch and torchvision (seconds, every stage, every run). The end-to-end tests put a
`python` of their own first on DVC's PATH: it hands its script, arguments, working directory,
environment and standard streams to this server, which imported those libraries once and forks
a child that runs the script as `python <script>` would (`__main__`, `sys.argv`, `sys.path[0]`,
exit status, atexit, signals). The server never imports twophase: each child imports the test
project's own copy through the stage script, as a plain process does.

A child leaves as the interpreter does (non-daemon threads joined, atexit, the script's
`__main__` released so that its finalizers run and files it left open are flushed, the standard
streams flushed, status 120 when stdout cannot be) but does not tear down the modules: that
teardown writes to every page the server shares with it (seconds per stage). What only that
teardown would do (finalizers of objects held by imported modules, C-level exit handlers) is
seen by the runs with the real python alone.

Anything but `python <script.py> ...` with an existing script (`-m`, `-c`, flags), or no server,
runs the real python.

`dvc` itself is served the same way by a second server, which imported DVC's modules (most of a
short dvc command's time): its `dvc` runs the venv's own `dvc` console script in a child, as the
shebang would, whenever the environment is the server's (but for PATH and pytest's
current test); otherwise the real one. A served process is the server's child, not its caller's:
it leads a process group of its own in the servers' session (a signal to its caller's group does
not reach it; one to its own group, such as `dvc queue kill` without `--force` sends to a queued
experiment, reaches it and its descendants alone, as for the queue's real, detached worker), does
not inherit the caller's ignored signals, and shares the server's hash seed with every other
served process.
The first run on a user's image folder (tests/test_e2e_data.py) starts dvc and every stage
for real (`run(..., plain=True)`), so each is also proven to start as a user's does.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import select
import signal
import socket
import sys
from typing import Any, NoReturn

# Imported once in each server, before any fork: for the stages, third-party only (never
# twophase); for dvc, the modules its commands import (status, repro, exp run/show, metrics,
# params, plots, dag, queue).
PRELOAD = {
    "python": (
        "numpy",
        "pandas",
        "yaml",
        "PIL.Image",
        "torch",
        "torchvision",
        "sklearn.datasets",
        "sklearn.model_selection",
        "onnx",
        "onnxscript",
        "matplotlib.pyplot",
    ),
    "dvc": (
        "dvc.cli",
        "dvc.cli.parser",
        "dvc.repo",
        "dvc.repo.index",
        "dvc.repo.experiments.show",
        "dvc.repo.experiments.queue.celery",
        "dvc.repo.reproduce",
        "dvc.repo.plots",
        "dvc.repo.metrics.show",
        "dvc.repo.params.show",
        "dvc.repo.status",
        "dvc.repo.checkout",
        "dvc.dvcfile",
        "dvc.stage.cache",
        "dvc.output",
        "dvc_render",
        "scmrepo.git.backend.pygit2",
        "scmrepo.git.backend.dulwich",
        "networkx",
    ),
}
# Read by libraries as they are imported, so fixed in the server for good: a request whose
# environment differs in any of them runs the real python instead.
IMPORT_TIME_ENV = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "PYTHONPATH",
    "PYTHONHASHSEED",
    "PYTHONWARNINGS",
    "MPLBACKEND",
    "TORCH_LOGS",
)
# Free to differ between the dvc server and a request: PATH, and what pytest sets for each test
# (read by nothing that DVC imports).
VARYING_ENV = ("PATH", "PYTEST_CURRENT_TEST")
SHIM = """#!{python} -I
# The end-to-end tests' `{name}` (tests/stage_server.py): `python <script.py> ...`, or the
# `dvc` console script, runs in a child of a fork server; anything else runs for real.
import json, os, signal, socket, sys

REAL = {python!r}
SCRIPT = {script!r}  # the console script this shim stands for; None for python itself
SERVER_ENV = {server_env!r}
EXACT = {exact!r}  # the whole environment but VARYING is the server's, or only SERVER_ENV's keys
VARYING = {varying!r}
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
args = sys.argv[1:] if SCRIPT is None else [SCRIPT, *sys.argv[1:]]
if EXACT:
    same_env = {{k: v for k, v in os.environ.items() if k not in VARYING}} == SERVER_ENV
else:
    same_env = all(os.environ.get(key) == value for key, value in SERVER_ENV.items())
if not (args and (SCRIPT or args[0].endswith(".py")) and os.path.isfile(args[0]) and same_env):
    os.execv(REAL, [REAL, *args])
conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    conn.connect({address!r})
except OSError:
    os.execv(REAL, [REAL, *args])
signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)  # held until the child's pid is known
request = json.dumps({{"argv": args, "cwd": os.getcwd(), "env": dict(os.environ)}}).encode()
socket.send_fds(conn, [len(request).to_bytes(8, "big") + request], [0, 1, 2])
reply = conn.makefile("rb")
child = int(reply.readline())
for number in FORWARDED:
    signal.signal(number, lambda sig, frame: os.kill(child, sig))
signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
status = int(reply.readline() or b"-9")
if status < 0:  # the child died of a signal: so does this process, as DVC would see it
    if -status not in (signal.SIGKILL, signal.SIGSTOP):
        signal.signal(-status, signal.SIG_DFL)
    os.kill(os.getpid(), -status)
sys.exit(status)
"""


def serve(address: str, kind: str) -> None:
    for name in PRELOAD[kind]:
        with contextlib.suppress(ImportError):  # a child imports what is missing, or fails as usual
            __import__(name)
    if kind == "dvc":
        _undo_dvc_logging_setup()
    gc.freeze()  # what the server holds is never scanned by a child's collector (no page copied)
    parent = os.getppid()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(address)
    listener.listen(16)
    clients: dict[int, socket.socket] = {}
    print("ready", flush=True)
    while os.getppid() == parent:  # the test process is gone: so is the server, and its children
        readable, _, _ = select.select([listener, *clients.values()], [], [], 0.05)
        for pid, conn in list(clients.items()):
            if conn in readable:  # the shim closed its end (it was killed): so ends its child
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if listener in readable:
            conn, _ = listener.accept()
            try:
                request, fds = _receive(conn)
            except (OSError, ValueError):  # a shim gone before its request arrived whole
                conn.close()
                continue
            pid = os.fork()
            if pid == 0:  # never back into this loop: the script's exit is the process's
                listener.close()
                conn.close()
                _run_child(request, fds, kind)  # never returns
            for fd in fds:
                os.close(fd)
            with contextlib.suppress(OSError):  # a shim gone meanwhile: its EOF kills the child
                conn.sendall(f"{pid}\n".encode())
            clients[pid] = conn
        for pid, conn in list(clients.items()):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                code = os.waitstatus_to_exitcode(status)
                with contextlib.suppress(OSError):  # the shim is gone: nobody waits for it
                    conn.sendall(f"{code}\n".encode())
                conn.close()
                del clients[pid]
    for pid in clients:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _receive(conn: socket.socket) -> tuple[dict, list[int]]:
    """A shim's request (argv, cwd, env) and its three standard streams."""
    header, fds, _, _ = socket.recv_fds(conn, 8, 3)
    if len(fds) != 3:
        for fd in fds:
            os.close(fd)
        raise ValueError("no standard streams came with the request")
    size = int.from_bytes(header, "big")
    body = b""
    while len(body) < size:
        chunk = conn.recv(size - len(body))
        if not chunk:
            for fd in fds:
                os.close(fd)
            raise ValueError("the request ended early")
        body += chunk
    return json.loads(body), fds


def _undo_dvc_logging_setup() -> None:
    """Importing dvc runs `dvc.logger.setup()`, which binds the importing process's streams and
    environment (colorama's wrapping of stdout/stderr, the log handlers and their colours,
    DVC_SHOW_TRACEBACK): the server undoes it, and each child sets it up on its own.
    dvc_studio_client's handler keeps the server's stderr object, whose file descriptor 2 is,
    in a child, the request's stderr."""
    import logging

    import colorama

    for name in ("dvc", "dvc_objects", "dvc_data"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
    colorama.deinit()


def _run_child(request: dict, fds: list[int], kind: str) -> NoReturn:
    """Become the process `python <script>` would have started, run the script, and leave as the
    interpreter leaves after it: the traceback of an uncaught exception, SystemExit's status or
    message, death by SIGINT on KeyboardInterrupt, then the exit work of `_leave`."""
    import io

    os.setpgid(0, 0)  # a group of its own: a signal to it reaches neither the server nor pytest
    for number in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGCHLD):
        signal.signal(number, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.environ.clear()
    os.environ.update(request["env"])
    unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))

    def stream(fd: int, mode: str) -> io.TextIOWrapper:
        """As the interpreter opens fd 0, 1, 2: stdout line-buffered on a terminal, stderr
        line-buffered, and with PYTHONUNBUFFERED no buffer at all between text and file."""
        raw = io.FileIO(fd, mode, closefd=False)
        writes_through = unbuffered and "w" in mode  # as CPython's -u: text straight to the file
        buffer: Any = raw
        if not writes_through:
            buffer = io.BufferedWriter(raw) if "w" in mode else io.BufferedReader(raw)
        return io.TextIOWrapper(
            buffer,
            encoding="utf-8",
            errors="backslashreplace" if fd == 2 else "strict",
            line_buffering=raw.isatty() or fd == 2,
            write_through=writes_through,
        )

    sys.stdin, sys.stdout, sys.stderr = stream(0, "r"), stream(1, "w"), stream(2, "w")
    if kind == "dvc" and "dvc.logger" in sys.modules:  # as `import dvc` did in the server
        sys.modules["dvc.logger"].setup()
    if "numpy" in sys.modules:  # its global RandomState was seeded once, in the server
        sys.modules["numpy"].random.seed()
    os.chdir(request["cwd"])
    script, *args = request["argv"]
    sys.argv = [script, *args]
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    status, die_by = 0, None
    try:
        _run_main(script)
    except SystemExit as stop:
        status = _exit_status(stop.code)
    except KeyboardInterrupt:  # the traceback, the exit work, then death by SIGINT
        sys.excepthook(*sys.exc_info())
        status, die_by = 128 + signal.SIGINT, signal.SIGINT
    except BaseException:
        sys.excepthook(*sys.exc_info())
        status = 1
    _leave(status, die_by)


def _exit_status(code: object) -> int:
    """The status CPython gives `SystemExit(code)`: None is 0, an int its own (-1 when it does
    not fit a C long), anything else is printed to stderr and gives 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code if -(2**63) <= code < 2**63 else -1
    if sys.stderr is not None:
        print(code, file=sys.stderr)
    else:  # CPython writes to the C-level stderr
        os.write(2, f"{code}\n".encode())
    return 1


def _leave(status: int, die_by: int | None = None) -> NoReturn:
    """The interpreter's exit work: wait for non-daemon threads, run atexit, release the
    script's `__main__` (its finalizers run while its globals still exist, then files it left
    open are flushed and closed), flush the standard streams (a failed stdout flush makes the
    status 120, as in CPython); then exit with `status`, or die by the signal `die_by`. The
    inherited libraries are not torn down (module docstring)."""
    import atexit
    import weakref

    try:
        if "threading" in sys.modules:
            sys.modules["threading"]._shutdown()  # type: ignore[attr-defined]
        atexit._run_exitfuncs()
        main = sys.modules.pop("__main__", None)
        alive = weakref.ref(main) if main is not None else None
        del main
        gc.collect()
        if alive is not None and (main := alive()) is not None:  # still referenced: as CPython
            names = sorted(main.__dict__, key=lambda name: not name.startswith("_"))
            for name in names:
                if name != "__builtins__":
                    main.__dict__[name] = None
            del main
            gc.collect()
        try:
            if sys.stdout is not None and not sys.stdout.closed:
                sys.stdout.flush()
        except Exception as error:  # reported as CPython reports it
            status = 120
            _report(error, sys.stdout)
        with contextlib.suppress(Exception):  # CPython ignores a failed stderr flush
            sys.stderr.flush()
    except BaseException as error:  # an error in the exit work: reported, not fatal
        _report(error, None)
    finally:
        if die_by is not None:
            signal.signal(die_by, signal.SIG_DFL)
            os.kill(os.getpid(), die_by)
        os._exit(status & 0xFF)


def _report(error: BaseException, obj: object) -> None:
    """An error of the exit work on stderr, as CPython reports an unraisable one."""
    import traceback

    with contextlib.suppress(BaseException):
        sys.stderr.write(f"Exception ignored in: {obj!r}\n")
        traceback.print_exception(error, file=sys.stderr)
        sys.stderr.flush()


def _run_main(script: str) -> None:
    """Run `script` as the interpreter runs `python script`: a fresh `__main__` module whose
    `__file__` is absolute, `sys.argv[0]` as given. The module is `__main__` before the source
    is read, so that an error reading or compiling it leaves as the script's."""
    import builtins
    import importlib.machinery
    import types

    path = os.path.abspath(script)
    main = types.ModuleType("__main__")
    main.__file__ = path
    main.__builtins__ = builtins
    main.__loader__ = importlib.machinery.SourceFileLoader("__main__", path)
    sys.modules["__main__"] = main
    with open(path, "rb") as source:
        code = compile(source.read(), path, "exec")
    exec(code, main.__dict__)


def shim(folder: str, address: str, server_env: dict[str, str], kind: str) -> str:
    """Write the `python` (kind "python") or `dvc` (kind "dvc") that talks to the server of that
    kind at `address`, started with `server_env`, into `folder`; the folder."""
    path = os.path.join(folder, kind)
    if kind == "dvc":
        script = os.path.join(os.path.dirname(sys.executable), "dvc")
        fixed = {key: value for key, value in server_env.items() if key not in VARYING_ENV}
    else:
        script, fixed = None, {key: server_env.get(key) for key in IMPORT_TIME_ENV}
    source = SHIM.format(
        python=sys.executable,
        name=kind,
        script=script,
        server_env=fixed,
        exact=kind == "dvc",
        varying=VARYING_ENV,
        address=address,
    )
    with open(path, "w") as out:
        out.write(source)
    os.chmod(path, 0o755)
    return folder


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2])
