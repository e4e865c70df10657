"""Peak memory of the features stage at N and 4N images: it must not grow with the dataset.

python bench/memory.py                # 200 and 800 images, 64 px
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from synth import make_imagefolder  # noqa: E402

CHILD = """
import json, resource, sys
from pathlib import Path
sys.path.insert(0, {src!r})
from twophase.datasets import index_imagefolder
from twophase.features import extract_features
from twophase.params import parse_params
from twophase.split import split_index
params = parse_params({{"device": "cpu", "data": {{"dataset": "imagefolder",
    "image_size": {size}}}, "model": {{"weights": "none"}},
    "features": {{"batch_size": 64, "num_workers": 0}}}})
split = split_index(index_imagefolder(Path({root!r})), 0.2, 42)
extract_features(params, split, Path({out!r}) / "embeddings", Path({out!r}) / "activations")
print(json.dumps({{"images": len(split),
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def peak_rss(root: Path, out: Path, size: int) -> dict[str, float]:
    code = CHILD.format(src=str(BENCH.parent / "src"), root=str(root), out=str(out), size=size)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/twophase-bench-memory"))
    args = parser.parse_args()
    rows = []
    for count in (args.images, 4 * args.images):
        root = make_imagefolder(args.workdir / f"images-{count}", count, classes=4, size=(200, 150))
        rows.append(peak_rss(root, args.workdir / f"features-{count}", args.image_size))
        print(json.dumps(rows[-1]), flush=True)
    growth = rows[1]["peak_rss_mib"] / rows[0]["peak_rss_mib"]
    print(f"peak RSS at 4x the images: {growth:.3f}x")


if __name__ == "__main__":
    main()
