"""DVC's own share of a stage with a large output, by cache.type: is the output read once?

In a scratch git + DVC repo, one stage writes a file of `--mib` MiB (as the features stage
writes the activation cache). For each cache.type it times the stage's command alone, then
`dvc commit --force` of its new output: what `dvc repro` adds after the command (hashing the
output, putting it in .dvc/cache, the lock file). With copies (DVC's default on a file system
without reflinks) DVC hashes the file and then copies it; with `hardlink` it hashes it and
links it. Also reports whether the workspace file and its cache entry are one inode.

    python bench/dvc_cache.py --mib 1024
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

WRITER = """
import os, sys
from pathlib import Path
mib = int(sys.argv[1])
Path("out").mkdir(exist_ok=True)
chunk = os.urandom(1 << 20)
with open("out/.big.tmp", "wb") as f:
    for _ in range(mib):
        f.write(chunk)
os.replace("out/.big.tmp", "out/big.bin")
"""


def sh(repo: Path, *command: str) -> float:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    start = time.perf_counter()
    subprocess.run(command, cwd=repo, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def measure(workdir: Path, cache_type: str | None, mib: int, repeats: int) -> dict[str, object]:
    repo = workdir / (cache_type or "default")
    shutil.rmtree(repo, ignore_errors=True)
    repo.mkdir(parents=True)
    (repo / "write.py").write_text(WRITER)
    (repo / "dvc.yaml").write_text(
        f"stages:\n  write:\n    cmd: python write.py {mib}\n    deps: [write.py]\n"
        "    outs: [out]\n"
    )
    sh(repo, "git", "init", "-q")
    sh(repo, "dvc", "init", "-q")
    if cache_type:
        sh(repo, "dvc", "config", "cache.type", cache_type)
    sh(repo, "dvc", "repro")
    alone, share = [], []
    for _ in range(repeats):
        alone.append(sh(repo, sys.executable, "write.py", str(mib)))
        os.sync()  # the write-back of the new file is the command's cost, not DVC's
        share.append(sh(repo, "dvc", "commit", "--force", "write"))
    workspace = repo / "out" / "big.bin"
    linked = any(
        entry.is_file() and entry.stat().st_ino == workspace.stat().st_ino
        for entry in (repo / ".dvc" / "cache").rglob("*")
    )
    return {
        "cache.type": cache_type or "default (reflink, copy)",
        "command alone s": round(statistics.median(alone), 2),
        "DVC's share s (dvc commit of the new output)": round(statistics.median(share), 2),
        "workspace file is the cache entry": linked,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/twophase-bench-dvc-cache"))
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    for cache_type in (None, "hardlink"):
        print(measure(args.workdir, cache_type, args.mib, args.repeats), flush=True)
    shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
