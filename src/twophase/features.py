"""The frozen part of the network, run once per image, its outputs cached as .npy files.

Two folders, two DVC outputs, so that phase 1 depends only on what it reads:
- embeddings (phase 1's input): `<subset>_embeddings.npy`, the pooled backbone output, plus
  `<subset>_labels.npy`, `backbone.pt` (the backbone's weights) and `meta.json`. They do not
  depend on where the network is cut, and are byte-identical whatever `finetune.unfreeze` is;
- activations (phase 2's input): `<subset>_activations.npy`, the input of the first unfrozen
  block, stored channels-last (N, H, W, C): the layout the CPU convolutions run fastest in,
  plus `<subset>_labels.npy` and `meta.json` (the cut).
Arrays are appended to their files batch by batch, so memory stays flat as the dataset grows,
and are read back memory-mapped.
"""

from __future__ import annotations

import math
import shutil
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from twophase.batches import BatchOrder
from twophase.errors import TwophaseError
from twophase.images import ImageDataset, image_batches
from twophase.io import atomic_path, read_json, write_json
from twophase.model import (
    Preprocessing,
    backbone_blocks,
    build_backbone,
    embedding_dim,
    preprocessing,
)
from twophase.params import Params
from twophase.runtime import autocast, autocast_dtype, resolve_device, seed_everything

SUBSETS = ("train", "val", "test")
BACKBONE = "backbone.pt"


class FrozenTrunk(nn.Module):
    """Blocks before the cut give the activations; the rest, pooled, give the embedding."""

    def __init__(self, blocks: OrderedDict[str, nn.Module], cut: str) -> None:
        super().__init__()
        names = list(blocks)
        position = names.index(cut)
        self.before = nn.Sequential(OrderedDict((n, blocks[n]) for n in names[:position]))
        self.after = nn.Sequential(OrderedDict((n, blocks[n]) for n in names[position:]))
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.cut = cut

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        activations = self.before(images)
        return activations, self.pool(self.after(activations))


def extract(
    trunk: FrozenTrunk,
    subsets: dict[str, tuple[Sequence[str], Sequence[int]]],
    embeddings_dir: Path,
    activations_dir: Path,
    *,
    image_size: int,
    prep: Preprocessing,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    meta: dict[str, Any] | None = None,
    backbone_state: dict[str, torch.Tensor] | None = None,
) -> None:
    """Run the frozen trunk over every image once and write both cache folders atomically."""
    # outside inference mode: parameters converted inside it could never train again
    trunk.to(device).to(memory_format=torch.channels_last).eval()
    act_shape, emb_shape = output_shapes(trunk, image_size, device)
    rows = sum(len(labels) for _, labels in subsets.values())
    check_free_space(activations_dir.parent, rows * (math.prod(act_shape) + math.prod(emb_shape)))
    with (
        atomic_path(embeddings_dir) as emb_tmp,
        atomic_path(activations_dir) as act_tmp,
        torch.inference_mode(),
    ):
        emb_tmp.mkdir(parents=True)
        act_tmp.mkdir(parents=True)
        if backbone_state is not None:
            torch.save({k: v.clone() for k, v in backbone_state.items()}, emb_tmp / BACKBONE)
        shapes: dict[str, Any] = {}
        for subset, (paths, labels) in subsets.items():
            if not paths:
                raise FeatureCacheError(f"the {subset} subset has no images")
            dataset = ImageDataset(paths, labels, image_size, prep)
            order = BatchOrder(len(dataset), batch_size, shuffle=False)
            act_file = NpyAppender(act_tmp / f"{subset}_activations.npy", len(dataset), act_shape)
            emb_file = NpyAppender(emb_tmp / f"{subset}_embeddings.npy", len(dataset), emb_shape)
            with tqdm(total=len(dataset), desc=f"features {subset}", unit="img") as bar:
                for images, _ in image_batches(dataset, order, num_workers):
                    images = images.to(device, non_blocking=True)
                    images = images.contiguous(memory_format=torch.channels_last)
                    with autocast(device, amp_dtype):
                        activations, embeddings = trunk(images)
                    act_file.append(activations.permute(0, 2, 3, 1).float().cpu().numpy())
                    emb_file.append(embeddings.float().cpu().numpy())
                    bar.update(len(images))
            act_file.close()
            emb_file.close()
            for folder in (emb_tmp, act_tmp):
                np.save(folder / f"{subset}_labels.npy", np.asarray(labels, dtype=np.int64))
            shapes[subset] = {"images": len(dataset)}
        meta = {**(meta or {}), "subsets": shapes}
        write_json(meta, emb_tmp / "meta.json")
        write_json({"cut": trunk.cut, "shape": list(act_shape), **meta}, act_tmp / "meta.json")


class FeatureCacheError(TwophaseError):
    """The feature cache cannot be written, or does not fit the params."""


def output_shapes(
    trunk: FrozenTrunk, image_size: int, device: torch.device
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Per-image shapes of (activations NHWC, embedding), from one blank image."""
    with torch.inference_mode():
        blank = torch.zeros(1, 3, image_size, image_size, device=device)
        activations, embeddings = trunk(blank.contiguous(memory_format=torch.channels_last))
    return tuple(activations.permute(0, 2, 3, 1).shape[1:]), tuple(embeddings.shape[1:])


def check_free_space(folder: Path, values: int, itemsize: int = 4) -> None:
    """Fail before any work when the cache cannot fit on the disk it is written to."""
    folder.mkdir(parents=True, exist_ok=True)
    needed, free = values * itemsize, shutil.disk_usage(folder).free
    if needed > free:
        raise FeatureCacheError(
            f"the feature cache needs {_gib(needed)} in {folder}/ but only {_gib(free)} is free "
            "there (DVC then copies it into .dvc/cache, on the same disk by default): free space, "
            "or lower data.image_size or unfreeze fewer blocks (finetune.unfreeze)"
        )


def _gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB"


class NpyAppender:
    """Writes a float32 .npy file of known shape batch by batch with plain appends.

    Plain writes leave the bytes to the OS page cache; filling a writable memmap instead would
    keep every written page resident in this process, so its RSS would grow with the dataset.
    """

    def __init__(self, path: Path, rows: int, shape: tuple[int, ...]) -> None:
        self.rows, self.shape, self.written = rows, shape, 0
        self.handle = path.open("wb")
        header = {"descr": "<f4", "fortran_order": False, "shape": (rows, *shape)}
        np.lib.format.write_array_header_2_0(self.handle, header)

    def append(self, batch: np.ndarray) -> None:
        if batch.shape[1:] != self.shape or self.written + len(batch) > self.rows:
            raise ValueError(f"batch of shape {batch.shape} does not fit {self.shape}")
        self.handle.write(np.ascontiguousarray(batch, dtype="<f4").tobytes())
        self.written += len(batch)

    def close(self) -> None:
        self.handle.close()
        if self.written != self.rows:
            raise ValueError(f"wrote {self.written} rows of {self.rows}")


def load_embeddings(
    embeddings_dir: Path, subset: str, in_memory: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings, labels) of one subset: phase 1's input, memory-mapped unless `in_memory`."""
    mode: Literal["r"] | None = None if in_memory else "r"
    return (
        np.load(embeddings_dir / f"{subset}_embeddings.npy", mmap_mode=mode),
        np.load(embeddings_dir / f"{subset}_labels.npy"),
    )


def load_activations(activations_dir: Path, subset: str) -> tuple[np.ndarray, np.ndarray]:
    """(activations, labels) of one subset: phase 2's input, always memory-mapped (large)."""
    return (
        np.load(activations_dir / f"{subset}_activations.npy", mmap_mode="r"),
        np.load(activations_dir / f"{subset}_labels.npy"),
    )


def load_meta(features_dir: Path) -> dict[str, Any]:
    meta: dict[str, Any] = read_json(features_dir / "meta.json")
    return meta


def extract_features(
    params: Params, split: pd.DataFrame, embeddings_dir: Path, activations_dir: Path
) -> dict[str, Any]:
    """The features stage: build the frozen trunk the params describe and cache its outputs."""
    from twophase.datasets import class_names

    seed_everything(params.seed)
    device = resolve_device(params.device)
    cut = params.cut_block
    backbone = build_backbone(params.model.arch, params.model.weights)
    trunk = FrozenTrunk(backbone_blocks(backbone), cut)
    prep = preprocessing(params.model.arch, params.model.weights)
    subsets = {
        name: (rows["path"].tolist(), rows["label"].tolist())
        for name in SUBSETS
        for rows in [split[split["subset"] == name]]
    }
    meta = {
        "embedding_dim": embedding_dim(backbone),
        "arch": params.model.arch,
        "weights": params.model.weights,
        "image_size": params.data.image_size,
        "preprocessing": asdict(prep),
        "class_names": class_names(split),
    }
    extract(
        trunk,
        subsets,
        embeddings_dir,
        activations_dir,
        image_size=params.data.image_size,
        prep=prep,
        batch_size=params.features.batch_size,
        num_workers=params.features.num_workers,
        device=device,
        amp_dtype=autocast_dtype(device, params.precision),
        meta=meta,
        backbone_state=backbone.state_dict(),
    )
    return meta
