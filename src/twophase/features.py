"""The frozen part of the network, run once per image, its outputs cached as .npy files.

For each subset (train, val, test) the cache holds:
- `<subset>_embeddings.npy`: the pooled backbone output, i.e. the head's input (phase 1);
- `<subset>_activations.npy`: the input of the first unfrozen block (phase 2), stored
  channels-last (N, H, W, C): the layout the CPU convolutions run fastest in;
- `<subset>_labels.npy`;
and `backbone.pt` (the backbone's weights) and `meta.json`.
Arrays are appended to their files batch by batch, so memory stays flat as the dataset grows,
and are read back memory-mapped.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from twophase.batches import BatchOrder
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


@dataclass(frozen=True)
class SubsetFeatures:
    embeddings: np.ndarray
    activations: np.ndarray
    labels: np.ndarray


class FrozenTrunk(nn.Module):
    """Blocks before the cut give the activations; the rest, pooled, give the embedding."""

    def __init__(self, blocks: OrderedDict[str, nn.Module], cut: str) -> None:
        super().__init__()
        names = list(blocks)
        position = names.index(cut)
        self.before = nn.Sequential(OrderedDict((n, blocks[n]) for n in names[:position]))
        self.after = nn.Sequential(OrderedDict((n, blocks[n]) for n in names[position:]))
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        activations = self.before(images)
        return activations, self.pool(self.after(activations))


def extract(
    trunk: FrozenTrunk,
    subsets: dict[str, tuple[Sequence[str], Sequence[int]]],
    out_dir: Path,
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
    """Run the frozen trunk over every image once and write the cache folder atomically."""
    # outside inference mode: parameters converted inside it could never train again
    trunk.to(device).to(memory_format=torch.channels_last).eval()
    with atomic_path(out_dir) as tmp, torch.inference_mode():
        tmp.mkdir(parents=True)
        if backbone_state is not None:
            torch.save({k: v.clone() for k, v in backbone_state.items()}, tmp / BACKBONE)
        shapes: dict[str, Any] = {}
        for subset, (paths, labels) in subsets.items():
            dataset = ImageDataset(paths, labels, image_size, prep)
            order = BatchOrder(len(dataset), batch_size, shuffle=False)
            loader = image_batches(dataset, order, num_workers)
            act_file = emb_file = None
            with tqdm(total=len(dataset), desc=f"features {subset}", unit="img") as bar:
                for images, _ in loader:
                    images = images.to(device, non_blocking=True)
                    images = images.contiguous(memory_format=torch.channels_last)
                    with autocast(device, amp_dtype):
                        activations, embeddings = trunk(images)
                    activations = activations.permute(0, 2, 3, 1)  # NHWC
                    if act_file is None or emb_file is None:
                        act_file = NpyAppender(
                            tmp / f"{subset}_activations.npy",
                            len(dataset),
                            tuple(activations.shape[1:]),
                        )
                        emb_file = NpyAppender(
                            tmp / f"{subset}_embeddings.npy",
                            len(dataset),
                            tuple(embeddings.shape[1:]),
                        )
                    act_file.append(activations.float().cpu().numpy())
                    emb_file.append(embeddings.float().cpu().numpy())
                    bar.update(len(images))
            if act_file is None or emb_file is None:
                raise ValueError(f"the {subset} subset has no images")
            act_file.close()
            emb_file.close()
            np.save(tmp / f"{subset}_labels.npy", np.asarray(labels, dtype=np.int64))
            shapes[subset] = {"images": len(dataset)}
        write_json({**(meta or {}), "subsets": shapes}, tmp / "meta.json")


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


def load(features_dir: Path, subset: str, embeddings_in_memory: bool = False) -> SubsetFeatures:
    """One subset of the cache, memory-mapped: nothing is read until used.

    The (small) embeddings can be read into memory at once; the (large) activations never are.
    """
    mode: Literal["r"] | None = None if embeddings_in_memory else "r"
    return SubsetFeatures(
        embeddings=np.load(features_dir / f"{subset}_embeddings.npy", mmap_mode=mode),
        activations=np.load(features_dir / f"{subset}_activations.npy", mmap_mode="r"),
        labels=np.load(features_dir / f"{subset}_labels.npy"),
    )


def load_meta(features_dir: Path) -> dict[str, Any]:
    meta: dict[str, Any] = read_json(features_dir / "meta.json")
    return meta


def extract_features(params: Params, split: pd.DataFrame, out_dir: Path) -> dict[str, Any]:
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
        "cut": cut,
        "preprocessing": asdict(prep),
        "class_names": class_names(split),
    }
    extract(
        trunk,
        subsets,
        out_dir,
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
