"""Peak memory of every stage at N and 8N images: none may grow with the dataset.

Each stage script runs alone, in DAG order, in a copy of the project on a synthetic ImageFolder
(64 px, weights none); its peak RSS is that of its process (the largest of it and its reading
processes: `getrusage(RUSAGE_CHILDREN)` of a fresh parent per stage).

    python bench/memory.py                # 200 and 1600 images
    python bench/memory.py --images 100 --factor 4
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from run import STAGES, copy_project  # noqa: E402
from synth import make_imagefolder  # noqa: E402

MEASURE = """
import resource, subprocess, sys
done = subprocess.run([sys.executable, {script!r}])
print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
"""


def project(workdir: Path, images: int, image_size: int) -> Path:
    data = make_imagefolder(workdir / f"images-{images}", images, classes=4, size=(200, 150))
    repo = workdir / f"project-{images}"
    subprocess.run(["rm", "-rf", str(repo)], check=True)
    repo.mkdir(parents=True)
    copy_project(repo)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"].update(dataset="imagefolder", root=str(data), image_size=image_size)
    params["model"]["weights"] = "none"
    params["features"]["num_workers"] = 0
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return repo


def peak_rss_per_stage(repo: Path) -> dict[str, float]:
    peaks = {}
    for stage in STAGES:
        code = MEASURE.format(script=f"stages/{stage}.py")
        done = subprocess.run(
            [sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, check=True
        )
        returncode, peak = done.stdout.strip().splitlines()[-1].split()
        if returncode != "0":
            raise SystemExit(f"stage {stage} failed:\n{done.stderr[-2000:]}")
        peaks[stage] = round(float(peak), 1)
    return peaks


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--factor", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/twophase-bench-memory"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = {}
    for count in (args.images, args.factor * args.images):
        results[count] = peak_rss_per_stage(project(args.workdir, count, args.image_size))
        print(count, json.dumps(results[count]), flush=True)
    small, large = results[args.images], results[args.factor * args.images]
    for stage in STAGES:
        print(
            f"{stage:15s} {small[stage]:8.1f} MiB -> {large[stage]:8.1f} MiB "
            f"({large[stage] / small[stage]:.2f}x)"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
