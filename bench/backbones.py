"""The backbone table of docs/backbones.md: blocks, cache bytes per image, features speed per arch.

    python bench/backbones.py [--archs resnet18,convnext_tiny,...] [--images 32]

For each arch at 224 px (weights none: the same speed as pretrained): its blocks, the shape of
the activation cached for `finetune.unfreeze: 1` (the last block), bytes per image in float32
(the default `features.dtype`; float16 halves the activations) plus the float32 embedding, what
that makes for Oxford-IIIT Pet (7349 images) and Food-101 (101000), and images/s of the frozen
trunk's forward pass on this machine (channels-last, batch 16, inference mode, as the features
stage runs it).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from twophase.backbones import (
    block_names,
    describe,
)
from twophase.model import build_model, classifier_in_features
from twophase.network import FrozenTrunk

ARCHS = (
    "resnet18,resnet50,regnet_y_400mf,regnet_y_1_6gf,convnext_tiny,efficientnet_b0,"
    "efficientnet_v2_s,mobilenet_v3_large,vit_b_16,swin_t,swin_v2_t"
)
DATASETS = {"Pet": 7349, "Food-101": 101000}


def measure(arch: str, images: int, size: int = 224) -> str:
    model = build_model(arch, "none", size)
    family = describe(model, arch)
    blocks = block_names(model, family)
    embedding = classifier_in_features(model, family)
    trunk = FrozenTrunk(model, family, blocks[-1]).eval().to(memory_format=torch.channels_last)
    batch = torch.randn(16, 3, size, size).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        activations, _ = trunk(batch[:2])  # warm-up, and the cached shape
        start = time.perf_counter()
        for _ in range(max(1, images // len(batch))):
            trunk(batch)
        rate = max(1, images // len(batch)) * len(batch) / (time.perf_counter() - start)
    per_image = math.prod(activations.shape[1:]) * 4 + embedding * 4
    totals = ", ".join(f"{name} {per_image * n / 2**30:.2f} GiB" for name, n in DATASETS.items())
    shown = f"{blocks[0]} … {blocks[-1]} ({len(blocks)})"
    return (
        f"| `{arch}` | {shown} | {blocks[-1]} | {tuple(activations.shape[1:])} | "
        f"{per_image / 1024:.0f} KiB | {totals} | {rate:.1f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default=ARCHS)
    parser.add_argument("--images", type=int, default=32, help="images timed per arch")
    args = parser.parse_args()
    torch.manual_seed(0)
    print("| arch | blocks | `unfreeze: 1` | cached activation | bytes/image | totals | img/s |")
    print("|---|---|---|---|---|---|---|")
    for arch in args.archs.split(","):
        print(measure(arch, args.images), flush=True)


if __name__ == "__main__":
    main()
