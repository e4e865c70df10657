"""The frozen part of the network, run once per image, its outputs cached as .npy files.

Two folders, two DVC outputs, so that phase 1 depends only on what it reads:
- embeddings (phase 1's input): `<subset>_embeddings.npy`, the pooled backbone output, plus
  `<subset>_labels.npy`, `backbone.pt` (the backbone's weights) and `meta.json`. They do not
  depend on where the network is cut, and are byte-identical whatever `finetune.unfreeze` is;
- activations (phase 2's input): `<subset>_activations.npy`, the input of the first unfrozen
  block, stored channels-last (N, H, W, C): the layout the CPU convolutions run fastest in,
  plus `<subset>_labels.npy` and `meta.json` (the cut). When phase 2 streams the training
  images instead (`finetune.input: images`), the training split's activations are not written.
With `features.views: K`, the training split also gets `train_views_embeddings.npy` and
`train_views_activations.npy`: K augmented views of every training image, view-major
(K * N rows: view 1 of every image, then view 2, ...); `load_views` reads them as (K, N, ...).
Arrays are appended to their files batch by batch, so memory stays flat as the dataset grows,
and are read back memory-mapped.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from twophase.backbones import ArchError, Family, Layout, block_names, check_tail, describe
from twophase.batches import BatchOrder
from twophase.errors import TwophaseError
from twophase.images import DrawOrder, ImageDataset, image_batches
from twophase.io import atomic_path, read_json, write_json
from twophase.model import (
    Preprocessing,
    build_model,
    classifier_in_features,
    model_kwargs,
    preprocessing,
    resolve_cut,
)
from twophase.params import Params, ParamsError
from twophase.runtime import autocast, autocast_dtype, resolve_device, seed_everything

SUBSETS = ("train", "val", "test")
BACKBONE = "backbone.pt"
CACHED_VIEW = 0  # the draw tag of cached views; streamed phase 2 draws with its own tag


class FrozenTrunk(nn.Module):
    """The whole model up to its classifier, in eval mode: one pass gives both cached inputs.

    The embedding is what reaches the classifier; the activation is what enters block `cut`
    (caught by a forward pre-hook), or the image itself when every block trains (`cut=None`).
    Activations come out in their storage layout: feature maps channels-last (N, H, W, C).
    """

    def __init__(self, model: nn.Module, family: Family, cut: str | None) -> None:
        super().__init__()
        model.set_submodule(family.classifier, nn.Identity())
        self.model, self.cut = model, cut
        self.layout: Layout = "nchw" if cut is None else family.layout
        self._caught: torch.Tensor | None = None
        if cut is not None:
            model.get_submodule(cut).register_forward_pre_hook(self._catch)

    def _catch(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        self._caught = args[0]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embeddings = self.model(images)
        activations = images if self.cut is None else self._caught
        if activations is None:  # pragma: no cover - guards the family table
            raise RuntimeError(f"block {self.cut} was never reached")
        if self.layout == "nchw":
            activations = activations.permute(0, 2, 3, 1)
        return activations, embeddings


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
    dtype: str = "float32",
    views: int = 0,
    augment: Sequence[str] = (),
    seed: int = 0,
    train_activations: bool = True,
) -> None:
    """Run the frozen trunk over every image once (and over `views` augmented views of every
    training image) and write both cache folders atomically.

    `train_activations=False` leaves out the training split's activations (phase 2 streams it).
    """
    # outside inference mode: parameters converted inside it could never train again
    trunk.to(device).to(memory_format=torch.channels_last).eval()
    act_shape, emb_shape = output_shapes(trunk, image_size, device)
    train_rows = len(subsets["train"][1]) if "train" in subsets else 0
    rows = sum(len(labels) for _, labels in subsets.values()) + views * train_rows
    act_rows = rows - (0 if train_activations else (views + 1) * train_rows)
    act_bytes = math.prod(act_shape) * np.dtype(STORED_DTYPES[dtype]).itemsize
    check_free_space(activations_dir.parent, act_rows * act_bytes + rows * 4 * math.prod(emb_shape))
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
            dataset = ImageDataset(paths, labels, image_size, prep, augment, seed)
            order = BatchOrder(len(dataset), batch_size, shuffle=False)
            count = len(dataset)
            keep_acts = train_activations or subset != "train"
            # the plain (eval) view of every image, then each augmented view in turn
            passes: list[tuple[str, BatchOrder | DrawOrder]] = [(subset, order)]
            if subset == "train":
                passes += [
                    (f"{subset}_views", DrawOrder(order, CACHED_VIEW, v))
                    for v in range(1, views + 1)
                ]
            for stem in dict.fromkeys(stem for stem, _ in passes):
                rows_in_file = count * sum(1 for name, _ in passes if name == stem)
                act_file = (
                    NpyAppender(act_tmp / f"{stem}_activations.npy", rows_in_file, act_shape, dtype)
                    if keep_acts
                    else None
                )
                emb_file = NpyAppender(emb_tmp / f"{stem}_embeddings.npy", rows_in_file, emb_shape)
                for view, (_, draws) in enumerate(p for p in passes if p[0] == stem):
                    desc = f"features {subset}" + (
                        f" view {view + 1}/{views}" if stem != subset else ""
                    )
                    with tqdm(total=count, desc=desc, unit="img") as bar:
                        for images, _ in image_batches(dataset, draws, num_workers):
                            images = images.to(device, non_blocking=True)
                            images = images.contiguous(memory_format=torch.channels_last)
                            with autocast(device, amp_dtype):
                                activations, embeddings = trunk(images)
                            if act_file is not None:
                                act_file.append(activations)
                            emb_file.append(embeddings)
                            bar.update(len(images))
                emb_file.close()
                if act_file is not None:
                    act_file.close()
            for folder in (emb_tmp, act_tmp):
                np.save(folder / f"{subset}_labels.npy", np.asarray(labels, dtype=np.int64))
            shapes[subset] = {"images": len(dataset)}
        meta = {**(meta or {}), "subsets": shapes}
        if views:  # absent by default: the default cache stays byte-identical to earlier ones
            meta |= {"views": views, "augment": list(augment), "seed": seed}
        write_json(meta, emb_tmp / "meta.json")
        act_meta: dict[str, Any] = {"cut": trunk.cut, "layout": trunk.layout, "dtype": dtype}
        if not train_activations:
            act_meta["train_streamed"] = True
        write_json({**act_meta, "shape": list(act_shape), **meta}, act_tmp / "meta.json")


class FeatureCacheError(TwophaseError):
    """The feature cache cannot be written, or does not fit the params."""


def output_shapes(
    trunk: FrozenTrunk, image_size: int, device: torch.device
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Per-image shapes of (activations NHWC, embedding), from one blank image."""
    with torch.inference_mode():
        blank = torch.zeros(1, 3, image_size, image_size, device=device)
        try:
            activations, embeddings = trunk(blank.contiguous(memory_format=torch.channels_last))
        except (RuntimeError, AssertionError, ValueError) as err:  # e.g. ViT's patch grid
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ParamsError(
                f"data.image_size: {image_size} does not fit the model ({reason})"
            ) from None
    return tuple(activations.shape[1:]), tuple(embeddings.shape[1:])


def check_free_space(folder: Path, needed: int) -> None:
    """Fail before any work when the cache (`needed` bytes) cannot fit on the disk it goes to."""
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise FeatureCacheError(
            f"the feature cache needs {_gib(needed)} in {folder}/ but only {_gib(free)} is free "
            "there (DVC then copies it into .dvc/cache, on the same disk by default): free space, "
            "or lower data.image_size or unfreeze fewer blocks (finetune.unfreeze)"
        )


def _gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB"


# numpy has no bfloat16: its bits are stored as uint16 (read back in batches.py)
STORED_DTYPES = {"float32": "<f4", "float16": "<f2", "bfloat16": "<u2"}


class NpyAppender:
    """Writes an .npy file of known shape batch by batch with plain appends.

    Plain writes leave the bytes to the OS page cache; filling a writable memmap instead would
    keep every written page resident in this process, so its RSS would grow with the dataset.
    """

    def __init__(
        self, path: Path, rows: int, shape: tuple[int, ...], dtype: str = "float32"
    ) -> None:
        self.rows, self.shape, self.written, self.dtype = rows, shape, 0, dtype
        self.handle = path.open("wb")
        header = {"descr": STORED_DTYPES[dtype], "fortran_order": False, "shape": (rows, *shape)}
        np.lib.format.write_array_header_2_0(self.handle, header)

    def append(self, batch: torch.Tensor) -> None:
        if tuple(batch.shape[1:]) != self.shape or self.written + len(batch) > self.rows:
            raise ValueError(f"batch of shape {tuple(batch.shape)} does not fit {self.shape}")
        values = batch.detach().to("cpu", getattr(torch, self.dtype)).contiguous()
        if self.dtype == "bfloat16":
            values = values.view(torch.int16)
        self.handle.write(values.numpy().tobytes())
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


def load_views(features_dir: Path, kind: str, in_memory: bool = False) -> np.ndarray | None:
    """The training split's K augmented views, shaped (K, N, ...), of `kind` "embeddings" or
    "activations"; None when the cache holds none (features.views: 0)."""
    path = features_dir / f"train_views_{kind}.npy"
    if not path.exists():
        return None
    views: np.ndarray = np.load(path, mmap_mode=None if in_memory else "r")
    count = int(load_meta(features_dir)["views"])
    return views.reshape(count, len(views) // count, *views.shape[1:])


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
    arch, weights, size = params.model.arch, params.model.weights, params.data.image_size
    model = build_model(arch, weights, size)
    family = describe(model, arch)
    cut = resolve_cut(arch, block_names(model, family), params.finetune.unfreeze)
    if family.name == "timm" and cut is not None:
        try:
            check_tail(model, family, cut, size, arch)
        except ArchError as err:
            raise ParamsError(str(err)) from None
    embedding_dim = classifier_in_features(model, family)
    backbone_state = {
        k: v for k, v in model.state_dict().items() if not k.startswith(f"{family.classifier}.")
    }
    trunk = FrozenTrunk(model, family, cut)
    prep = preprocessing(arch, weights, model)
    subsets = {
        name: (rows["path"].tolist(), rows["label"].tolist())
        for name in SUBSETS
        for rows in [split[split["subset"] == name]]
    }
    meta = {
        "embedding_dim": embedding_dim,
        "arch": arch,
        "classifier": family.classifier,
        "model_kwargs": model_kwargs(arch, weights, size),
        "weights": weights,
        "image_size": size,
        "preprocessing": asdict(prep),
        "class_names": class_names(split),
    }
    extract(
        trunk,
        subsets,
        embeddings_dir,
        activations_dir,
        image_size=size,
        prep=prep,
        batch_size=params.features.batch_size,
        num_workers=params.features.num_workers,
        device=device,
        amp_dtype=autocast_dtype(device, params.precision),
        meta=meta,
        backbone_state=backbone_state,
        dtype=params.features.dtype,
        views=params.features.views,
        augment=params.data.augment,
        seed=params.seed,
        train_activations=params.finetune.input == "cached",
    )
    return {**meta, "cut": cut}
