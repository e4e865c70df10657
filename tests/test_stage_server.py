"""The end-to-end tests' fork server runs a script as the real python would: what DVC sees of a
stage (exit status, streams, signals) must not depend on which `python` started it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from tests.dvc_project import dvc_env


def python(
    tmp_path: Path,
    source: str,
    *args: str,
    stdin: str = "",
    plain: bool = False,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(source))
    env = {**dvc_env(plain=plain), "TWOPHASE_PROBE": "seen", **(env or {})}
    return subprocess.run(
        ["python", "script.py", *args],
        cwd=tmp_path,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


PROBE = """
    import json, os, sys
    print(json.dumps({
        "name": __name__, "file": __file__, "argv": sys.argv, "cwd": os.getcwd(),
        "path0": sys.path[0],
        "env": os.environ.get("TWOPHASE_PROBE"), "stdin": sys.stdin.read(),
        "server": "torch" in sys.modules,
    }))
    print("to stderr", file=sys.stderr)
"""


def test_a_script_sees_what_the_real_python_gives_it(tmp_path: Path) -> None:
    served = python(tmp_path, PROBE, "a", "--b=1", stdin="in")
    plain = python(tmp_path, PROBE, "a", "--b=1", stdin="in", plain=True)
    assert served.returncode == plain.returncode == 0, served.stderr
    seen, expected = json.loads(served.stdout), json.loads(plain.stdout)
    assert seen.pop("server") and not expected.pop("server"), "the child of the server ran it"
    assert (
        seen
        == expected
        == {
            "name": "__main__",
            "file": str(tmp_path / "script.py"),
            "argv": ["script.py", "a", "--b=1"],
            "cwd": str(tmp_path),
            "path0": str(tmp_path),
            "env": "seen",
            "stdin": "in",
        }
    )
    assert served.stderr == plain.stderr == "to stderr\n"


@pytest.mark.parametrize(
    ("source", "code"),
    [
        ("import sys; sys.exit(3)", 3),
        ("raise ValueError('bad stage')", 1),
        ("import sys; sys.exit('one line')", 1),
        ("import atexit; atexit.register(print, 'at exit')", 0),
        ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", -signal.SIGKILL),
        ("raise KeyboardInterrupt", -signal.SIGINT),  # Python dies of SIGINT, as DVC expects
        ("import sys; sys.stdout.write('in the buffer'); f = open('out', 'w'); f.write('x')", 0),
        # a non-daemon thread still running when the script ends is waited for
        (
            "import threading, time\n"
            "def late(): time.sleep(0.3); print('the thread ended')\n"
            "threading.Thread(target=late).start()",
            0,
        ),
        ("def broken(:\n    pass", 1),  # the SyntaxError is the last line, as the script's
        # a finalizer of the script's globals runs while they still exist
        ("import os\nclass T:\n    def __del__(self): os.write(1, b'finalized')\nt = T()", 0),
        ("import sys; sys.exit(-1)", 255),
        ("import sys; sys.exit(256)", 0),
        ("import sys; sys.exit(2**64)", 255),
        ("import sys; sys.exit(True)", 1),
    ],
)
def test_the_exit_status_is_the_scripts(tmp_path: Path, source: str, code: int) -> None:
    out = tmp_path / "out"
    buffered = {"PYTHONUNBUFFERED": ""}  # what is left in a buffer must be flushed at exit
    served = python(tmp_path, source, env=buffered)
    served_out = out.read_text() if out.exists() else None
    out.unlink(missing_ok=True)
    plain = python(tmp_path, source, plain=True, env=buffered)
    assert served.returncode == plain.returncode == code, served.stderr
    assert served.stdout == plain.stdout
    assert served.stderr.splitlines()[-1:] == plain.stderr.splitlines()[-1:]
    # a file left open is flushed at exit
    assert served_out == (out.read_text() if out.exists() else None)


def test_stdout_that_cannot_be_flushed_at_exit_gives_status_120(tmp_path: Path) -> None:
    (tmp_path / "script.py").write_text("import time; time.sleep(1); print('late')\n")
    codes = []
    for plain in (False, True):
        env = {**dvc_env(plain=plain), "PYTHONUNBUFFERED": ""}
        process = subprocess.Popen(
            ["python", "script.py"], cwd=tmp_path, env=env, stdout=subprocess.PIPE
        )
        assert process.stdout is not None
        process.stdout.close()  # the reader is gone before the script's output is flushed
        codes.append(process.wait(timeout=120))
    assert codes == [120, 120]


def test_unbuffered_output_reaches_the_stream_at_once(tmp_path: Path) -> None:
    source = "import os, sys; sys.stdout.write('written'); os._exit(0)"
    unbuffered = {"PYTHONUNBUFFERED": "1"}
    served = python(tmp_path, source, env=unbuffered)
    plain = python(tmp_path, source, env=unbuffered, plain=True)
    assert served.stdout == plain.stdout == "written"
    buffered = {"PYTHONUNBUFFERED": ""}  # empty is unset
    served, plain = (
        python(tmp_path, source, env=buffered),
        python(tmp_path, source, env=buffered, plain=True),
    )
    assert served.stdout == plain.stdout == "", "lost in the buffer, as with the real python"


def test_each_child_draws_its_own_unseeded_numbers(tmp_path: Path) -> None:
    source = "import numpy; print(numpy.random.randint(1 << 62))"
    assert python(tmp_path, source).stdout != python(tmp_path, source).stdout


def test_an_environment_read_at_import_runs_the_real_python(tmp_path: Path) -> None:
    source = "import sys, os; print('torch' in sys.modules, os.environ['OMP_NUM_THREADS'])"
    other = str(int(dvc_env().get("OMP_NUM_THREADS", "1")) + 1)
    done = python(tmp_path, source, env={"OMP_NUM_THREADS": other})
    assert done.stdout.split() == ["False", other], "the server's torch read another value"


def test_a_killed_shim_takes_its_child_with_it(tmp_path: Path) -> None:
    source = """
        import os, time
        open("pid", "w").write(str(os.getpid()))
        time.sleep(120)
    """
    (tmp_path / "script.py").write_text(textwrap.dedent(source))
    shim = subprocess.Popen(["python", "script.py"], cwd=tmp_path, env=dvc_env())
    deadline = time.monotonic() + 60
    while not (tmp_path / "pid").exists() or not (tmp_path / "pid").read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    child = int((tmp_path / "pid").read_text())
    assert child != shim.pid, "the child of the server ran it"
    shim.kill()
    shim.wait()
    while psutil.pid_exists(child) and psutil.Process(child).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the child outlived its shim"
        time.sleep(0.05)


def test_a_signal_to_the_shim_reaches_the_script(tmp_path: Path) -> None:
    source = """
        import os, signal, sys, time
        def stop(number, frame):  # it may arrive inside print("ready"): no print here
            os.write(1, b"terminated\\n")
            sys.exit(5)
        signal.signal(signal.SIGTERM, stop)
        print("ready", flush=True)
        time.sleep(60)
    """
    (tmp_path / "script.py").write_text(textwrap.dedent(source))
    shim = subprocess.Popen(
        ["python", "script.py"],
        cwd=tmp_path,
        env=dvc_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert shim.stdout is not None and shim.stdout.readline() == "ready\n", shim.communicate()
    shim.send_signal(signal.SIGTERM)
    assert shim.wait(timeout=30) == 5
    assert shim.stdout.read() == "terminated\n"


def test_anything_else_runs_the_real_python(tmp_path: Path) -> None:
    done = subprocess.run(
        ["python", "-c", "import sys; print('torch' in sys.modules, sys.executable)"],
        env=dvc_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.split() == ["False", sys.executable]
    missing = subprocess.run(
        ["python", "missing.py"], cwd=tmp_path, env=dvc_env(), capture_output=True, text=True
    )
    assert missing.returncode == 2 and "can't open file" in missing.stderr


ANCESTORS = """
import json, os, psutil
print(json.dumps([" ".join(p.cmdline()) for p in psutil.Process(os.getpid()).parents()]))
"""


def test_dvc_runs_in_a_child_of_its_server_as_the_real_dvc_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The served `dvc` runs the venv's console script: same output, same exit status; an
    environment other than the server's (but for PATH and pytest's current test) runs the real
    dvc."""
    dvc_env()  # the servers run (in this worker, maybe from an earlier test)
    monkeypatch.setenv("PYTEST_CURRENT_TEST", "another test")

    def dvc(*args: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["dvc", *args],
            cwd=tmp_path,
            env={**dvc_env(), **env},
            capture_output=True,
            text=True,
            timeout=120,
        )

    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    assert dvc("init", "-q").returncode == 0
    (tmp_path / "ancestors.py").write_text(ANCESTORS)
    # the stage's python is the real one (PYTHONHASHSEED, read at start-up, differs from the
    # server's): a child of dvc's
    seed = "1" if dvc_env().get("PYTHONHASHSEED") == "0" else "0"
    stage = f"PYTHONHASHSEED={seed} python ancestors.py"
    assert dvc("stage", "add", "-q", "-n", "probe", stage).returncode == 0

    def ancestors(done: subprocess.CompletedProcess) -> list[str]:
        assert done.returncode == 0, done.stderr
        return json.loads(next(line for line in done.stdout.splitlines() if line[:2] == '["'))

    served = ancestors(dvc("repro", "--force"))
    real = ancestors(dvc("repro", "--force", TWOPHASE_PROBE="another environment"))
    dvc_process = 0 if "ancestors.py" not in served[0] else 1  # through a shell, or not
    server = f"{Path(__file__).with_name('stage_server.py')} "  # with its socket and kind
    assert served[dvc_process].split(server)[1].endswith(" dvc"), served
    assert (
        real[dvc_process] == f"{sys.executable} {Path(sys.executable).parent / 'dvc'} repro --force"
    )
    assert not any(server in line for line in real), real

    for args in (("repro", "nothing"), ("status", "--no-such-flag"), ("version", "--help")):
        served_done, real_done = dvc(*args), dvc(*args, TWOPHASE_PROBE="x")
        assert (served_done.returncode, served_done.stdout, served_done.stderr) == (
            real_done.returncode,
            real_done.stdout,
            real_done.stderr,
        ), args
