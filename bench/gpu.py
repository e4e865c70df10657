"""Per-stage throughput on a GPU against the floor of the same model on the same device.

One short script for scarce GPU time (about 2 minutes at the defaults on one modern GPU):
  - features: images/s of `features.extract` over synthetic JPEGs (decoding included), against
    the trunk's forward pass alone on tensors already on the device;
  - phase 2: rows/s of one `train.fit` epoch on cached activations, against forward + backward
    of the unfrozen blocks + head alone on a batch already on the device;
  - phase 1: rows/s of `train.fit` on cached embeddings against the head's forward + backward.
Precision `auto` (bf16 where the GPU computes it natively, else fp16). Prints one JSON object.

    python bench/gpu.py --arch resnet50 --images 512
    python bench/gpu.py --device cpu --images 32 --size 64     # a smoke run anywhere
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "src"))
sys.path.insert(0, str(BENCH))

from synth import make_imagefolder  # noqa: E402

from twophase import cache, features, network  # noqa: E402
from twophase.backbones import block_names, describe  # noqa: E402
from twophase.batches import array_batches  # noqa: E402
from twophase.datasets import index_imagefolder  # noqa: E402
from twophase.model import Preprocessing, build_head, build_model, classifier_in_features  # noqa: E402
from twophase.network import Tail, set_trainable  # noqa: E402
from twophase.params import PhaseParams  # noqa: E402
from twophase.runtime import autocast, autocast_dtype, resolve_device  # noqa: E402
from twophase.train import fit  # noqa: E402


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step, device: torch.device, repeats: int) -> float:  # type: ignore[no-untyped-def]
    step()  # warm-up: kernels chosen, memory allocated
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    synchronize(device)
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = resolve_device(args.device)
    amp = autocast_dtype(device, "auto")
    result: dict[str, object] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "arch": args.arch,
        "autocast": str(amp),
        "images": args.images,
        "size": args.size,
    }
    work = Path(tempfile.mkdtemp(prefix="twophase-gpu-"))
    root = make_imagefolder(work / "images", args.images, classes=4, test_share=0.5)
    split = index_imagefolder(root)
    paths, labels = split["path"].tolist(), split["label"].tolist()

    model = build_model(args.arch, "none", args.size)
    family = describe(model, args.arch)
    cut = block_names(model, family)[-1]
    trunk = network.FrozenTrunk(copy.deepcopy(model), family, cut).to(device).eval()
    trunk = trunk.to(memory_format=torch.channels_last)
    images = torch.randn(args.batch, 3, args.size, args.size, device=device)
    images = images.contiguous(memory_format=torch.channels_last)

    def forward() -> None:
        with torch.inference_mode(), autocast(device, amp):
            trunk(images)

    result["features_floor_img_s"] = round(args.batch / timed(forward, device, 5), 1)
    start = time.perf_counter()
    features.extract(
        trunk,
        {"train": (paths, labels)},
        work / "embeddings",
        work / "activations",
        image_size=args.size,
        prep=Preprocessing(),
        batch_size=args.batch,
        num_workers=args.workers,
        device=device,
        amp_dtype=amp,
    )
    synchronize(device)
    result["features_img_s"] = round(len(paths) / (time.perf_counter() - start), 1)

    activations, cached_labels = cache.load_activations(work / "activations", "train")
    width = classifier_in_features(model, family)
    model.set_submodule(family.classifier, build_head(width, [256], 0.3, 4))
    tail = Tail(model, family, cut, freeze_batchnorm=True)
    set_trainable(model, tail)
    tail.to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam([p for p in tail.parameters() if p.requires_grad], lr=1e-5)
    batch = torch.from_numpy(np.array(activations[: args.batch])).permute(0, 3, 1, 2)
    batch = batch.to(device).contiguous(memory_format=torch.channels_last)
    targets = torch.zeros(len(batch), dtype=torch.long, device=device)

    def train_step() -> None:
        tail.train()
        with autocast(device, amp):
            loss = torch.nn.functional.cross_entropy(tail(batch).float(), targets)
        optimizer.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()

    result["phase2_floor_rows_s"] = round(len(batch) / timed(train_step, device, 5), 1)
    rows = len(cached_labels)
    fitted = fit(
        tail,
        (
            array_batches(activations, cached_labels, args.batch, True, nhwc=True),
            array_batches(activations[:1], cached_labels[:1], args.batch, nhwc=True),
        ),
        PhaseParams(lr=1e-5, epochs=2, patience=5),
        device=device,
        amp_dtype=amp,
    )
    result["phase2_rows_s"] = round(2 * rows / fitted.wall_seconds, 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
