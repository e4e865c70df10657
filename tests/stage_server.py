"""A fork server for the end-to-end tests' stage processes.

Every DVC stage is `python stages/<stage>.py`, and most of a stage's time on tiny data is spent
importing torch and torchvision (seconds, every stage, every run). The end-to-end tests put a
`python` of their own first on DVC's PATH: it hands its script, arguments, working directory,
environment and standard streams to this server, which imported those libraries once and forks
a child that runs the script as `python <script>` would (`__main__`, `sys.argv`, `sys.path[0]`,
exit status, atexit, signals). The server never imports twophase: each child imports the test
project's own copy through the stage script, as a plain process does.

Anything but `python <script.py> ...` with an existing script (`-m`, `-c`, flags), or no server,
runs the real python.
The first run on a user's image folder (tests/test_e2e_data.py) starts every stage with the real
python (`run(..., plain=True)`), so each is also proven to start as a user's does.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import sys

# Imported once in the server, before any fork (third-party only; never twophase).
PRELOAD = (
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
)
SHIM = """#!{python} -I
# The end-to-end tests' `python` (tests/stage_server.py): `python <script.py> ...` runs in a
# child of the fork server; anything else is the real python.
import json, os, signal, socket, sys

REAL = {python!r}
args = sys.argv[1:]
if not args or not args[0].endswith(".py") or not os.path.isfile(args[0]):
    os.execv(REAL, [REAL, *args])
conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    conn.connect({address!r})
except OSError:
    os.execv(REAL, [REAL, *args])
request = json.dumps({{"argv": args, "cwd": os.getcwd(), "env": dict(os.environ)}}).encode()
socket.send_fds(conn, [len(request).to_bytes(8, "big") + request], [0, 1, 2])
reply = conn.makefile("rb")
child = int(reply.readline())
for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
    signal.signal(number, lambda sig, frame: os.kill(child, sig))
status = int(reply.readline() or b"-9")
if status < 0:  # the child died of a signal: so does this process, as DVC would see it
    if -status not in (signal.SIGKILL, signal.SIGSTOP):
        signal.signal(-status, signal.SIG_DFL)
    os.kill(os.getpid(), -status)
sys.exit(status)
"""


def serve(address: str) -> None:
    for name in PRELOAD:
        with contextlib.suppress(ImportError):  # a child imports what is missing, or fails as usual
            __import__(name)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(address)
    listener.listen(16)
    clients: dict[int, socket.socket] = {}
    print("ready", flush=True)
    while True:
        readable, _, _ = select.select([listener], [], [], 0.05)
        if readable:
            conn, _ = listener.accept()
            pid = _start(conn, listener)
            if pid:
                clients[pid] = conn
        for pid, conn in list(clients.items()):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                code = os.waitstatus_to_exitcode(status)
                with contextlib.suppress(OSError):  # the shim is gone: nobody waits for it
                    conn.sendall(f"{code}\n".encode())
                conn.close()
                del clients[pid]


def _start(conn: socket.socket, listener: socket.socket) -> int:
    header, fds, _, _ = socket.recv_fds(conn, 8, 3)
    size = int.from_bytes(header, "big")
    body = b""
    while len(body) < size:
        body += conn.recv(size - len(body))
    request = json.loads(body)
    pid = os.fork()
    if pid:
        for fd in fds:
            os.close(fd)
        conn.sendall(f"{pid}\n".encode())
        return pid
    listener.close()
    conn.close()
    _run_child(request, fds)
    return 0  # unreachable: _run_child exits


def _run_child(request: dict, fds: list[int]) -> None:
    import atexit
    import io
    import threading
    import traceback

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
        raw = io.FileIO(fd, mode, closefd=False)
        interactive = raw.isatty()
        buffered = io.BufferedWriter(raw) if "w" in mode else io.BufferedReader(raw)
        return io.TextIOWrapper(
            buffered,
            encoding="utf-8",
            errors="backslashreplace" if fd == 2 else "strict",
            line_buffering=interactive or (fd == 2),
            write_through=unbuffered and "w" in mode,
        )

    sys.stdin, sys.stdout, sys.stderr = stream(0, "r"), stream(1, "w"), stream(2, "w")
    os.chdir(request["cwd"])
    script, *args = request["argv"]
    sys.argv = [script, *args]
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    code: int = 0
    try:
        _run_main(script)
    except SystemExit as stop:
        if stop.code is None:
            code = 0
        elif isinstance(stop.code, int):
            code = stop.code
        else:
            print(stop.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        traceback.print_exc()
        code = 130
    except BaseException:
        traceback.print_exc()
        code = 1
    try:
        threading._shutdown()  # type: ignore[attr-defined]  # as the interpreter does at exit
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def _run_main(script: str) -> None:
    """Run `script` as the interpreter runs `python script`: a fresh `__main__` module whose
    `__file__` is absolute, `sys.argv[0]` as given."""
    import builtins
    import importlib.machinery
    import types

    path = os.path.abspath(script)
    with open(path, "rb") as source:
        code = compile(source.read(), path, "exec")
    main = types.ModuleType("__main__")
    main.__file__ = path
    main.__builtins__ = builtins
    main.__loader__ = importlib.machinery.SourceFileLoader("__main__", path)
    sys.modules["__main__"] = main
    exec(code, main.__dict__)


def shim(folder: str, address: str) -> str:
    """Write the `python` that talks to the server at `address` into `folder`; the folder."""
    path = os.path.join(folder, "python")
    with open(path, "w") as out:
        out.write(SHIM.format(python=sys.executable, address=address))
    os.chmod(path, 0o755)
    return folder


if __name__ == "__main__":
    serve(sys.argv[1])
