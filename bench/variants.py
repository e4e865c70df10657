"""Micro-measurements behind the CPU choices: memory layout, autocast dtype, decoding workers.

python bench/variants.py          # ResNet18 at 224 px on synthetic photo-like JPEGs
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "src"))
sys.path.insert(0, str(BENCH))

from synth import make_imagefolder  # noqa: E402

from twophase.backbones import describe  # noqa: E402
from twophase.batches import BatchOrder  # noqa: E402
from twophase.decode import load_rgb  # noqa: E402
from twophase.images import ImageBatches, ImageDataset, eval_transform  # noqa: E402
from twophase.model import Preprocessing, build_head, build_model  # noqa: E402
from twophase.network import (  # noqa: E402
    FrozenTrunk,
    Tail,
    set_trainable,
)


def rate(name: str, images: int, fn: Callable[[], object], repeats: int = 3) -> None:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    print(f"{name}: {repeats * images / (time.perf_counter() - start):.1f} images/s", flush=True)


def main() -> None:
    root = make_imagefolder(Path("/tmp/twophase-bench/variants"), 200, 4)
    paths = sorted(str(p) for p in (root / "train").rglob("*.jpg"))[:128]
    prep = Preprocessing()
    transform = eval_transform(224, prep)
    rate(
        "decode+resize+crop, full decode",
        len(paths),
        lambda: [transform(load_rgb(p)) for p in paths],
        repeats=1,
    )
    rate(
        "decode+resize+crop, draft decode",
        len(paths),
        lambda: [transform(load_rgb(p, 256)) for p in paths],
        repeats=1,
    )

    family = describe(build_model("resnet18", "none", 224), "resnet18")
    trunk = FrozenTrunk(build_model("resnet18", "none", 224), family, "layer4").eval()
    x = torch.randn(64, 3, 224, 224)
    with torch.inference_mode():
        rate("trunk forward fp32 NCHW", 64, lambda: trunk(x))

        def bf16() -> object:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return trunk(x)

        rate("trunk forward bf16 autocast", 64, bf16, repeats=1)
    trunk.to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        rate("trunk forward fp32 channels-last", 64, lambda: trunk(x_cl))
        for workers in (0, 1, 2):
            data = ImageDataset(paths, [0] * len(paths), 224, prep)
            loader = ImageBatches(data, BatchOrder(len(data), 64, False), workers)
            rate(
                f"decode + trunk, {workers} workers",
                len(paths),
                lambda loader=loader: [
                    trunk(i.contiguous(memory_format=torch.channels_last)) for i, _ in loader
                ],
                repeats=1,
            )

    model = build_model("resnet18", "none", 224)
    model.fc = build_head(512, [256], 0.3, 37)
    net = Tail(model, family, "layer4")
    set_trainable(model, net)
    optimizer = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], 1e-5)
    acts, labels = torch.randn(128, 256, 14, 14), torch.randint(0, 37, (128,))

    def step(inputs: torch.Tensor) -> None:
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(net(inputs), labels).backward()
        optimizer.step()

    for layout in (torch.contiguous_format, torch.channels_last):
        net.to(memory_format=layout).train()
        inputs = acts.contiguous(memory_format=layout)
        rate(f"layer4+head forward+backward, {layout}", 128, lambda inputs=inputs: step(inputs))
        with torch.inference_mode():
            net.eval()
            rate(f"layer4+head forward (eval), {layout}", 128, lambda inputs=inputs: net(inputs))


if __name__ == "__main__":
    main()
