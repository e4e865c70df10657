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

import io
import math
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from twophase.backbones import ArchError, Family, Layout, block_names, check_tail, describe
from twophase.batches import BatchOrder
from twophase.distributed import SINGLE, World
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
from twophase.runtime import autocast, autocast_dtype, seed_everything

if TYPE_CHECKING:  # pandas takes 0.3 s to import; the training stages never need it
    import pandas as pd

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
    world: World = SINGLE,
) -> None:
    """Run the frozen trunk over every image once (and over `views` augmented views of every
    training image) and write both cache folders atomically.

    `train_activations=False` leaves out the training split's activations (phase 2 streams it).
    Under DDP, rank r runs batches r, r + world, ... and writes their rows in place; the
    batches are those of one process, so the files are bitwise the same.
    """
    # outside inference mode: parameters converted inside it could never train again
    trunk.to(device).to(memory_format=torch.channels_last).eval()
    act_shape, emb_shape = output_shapes(trunk, image_size, device)
    if world.is_main:
        train_rows = len(subsets["train"][1]) if "train" in subsets else 0
        rows = sum(len(labels) for _, labels in subsets.values()) + views * train_rows
        act_rows = rows - (0 if train_activations else (views + 1) * train_rows)
        act_bytes = math.prod(act_shape) * np.dtype(STORED_DTYPES[dtype]).itemsize
        emb_bytes = 4 * math.prod(emb_shape)
        backbone_bytes = sum(v.numel() * v.element_size() for v in (backbone_state or {}).values())
        cache_bytes = act_rows * act_bytes + rows * emb_bytes + backbone_bytes
        check_free_space(activations_dir.parent, cache_bytes * dvc_copies())
    with (
        shared_atomic_path(embeddings_dir, world) as emb_tmp,
        shared_atomic_path(activations_dir, world) as act_tmp,
        torch.inference_mode(),
    ):
        if world.is_main and backbone_state is not None:
            torch.save({k: v.clone() for k, v in backbone_state.items()}, emb_tmp / BACKBONE)
        shapes: dict[str, Any] = {}
        for subset, (paths, labels) in subsets.items():
            if not paths:
                raise FeatureCacheError(f"the {subset} subset has no images")
            dataset = ImageDataset(paths, labels, image_size, prep, augment, seed)
            count = len(dataset)
            batches = list(BatchOrder(count, batch_size, shuffle=False))
            mine = batches[world.rank :: world.size]
            # the plain (eval) view of every image; then, for training, each augmented view
            passes: list[tuple[str, int]] = [(subset, 0)]
            if subset == "train":
                passes += [(f"{subset}_views", view) for view in range(1, views + 1)]
            files: dict[str, tuple[NpyRows | None, NpyRows]] = {}
            for stem in dict.fromkeys(stem for stem, _ in passes):
                in_file = count * sum(1 for name, _ in passes if name == stem)
                keep_acts = train_activations or subset != "train"
                make = partial(_shared_npy, world=world, rows=in_file)
                files[stem] = (
                    make(act_tmp / f"{stem}_activations.npy", act_shape, dtype)
                    if keep_acts
                    else None,
                    make(emb_tmp / f"{stem}_embeddings.npy", emb_shape, "float32"),
                )
            for stem, view in passes:
                act_file, emb_file = files[stem]
                draws = DrawOrder(mine, CACHED_VIEW, view) if view else mine
                offset = count * (view - 1) if view else 0
                desc = f"features {subset}" + (f" view {view}/{views}" if view else "")
                with tqdm(
                    total=count, desc=desc, unit="img", disable=None if world.is_main else True
                ) as bar:
                    loaded = image_batches(dataset, draws, num_workers)
                    for batch, (images, _) in zip(mine, loaded, strict=True):
                        images = images.to(device, non_blocking=True)
                        images = images.contiguous(memory_format=torch.channels_last)
                        with autocast(device, amp_dtype):
                            activations, embeddings = trunk(images)
                        if act_file is not None:
                            act_file.write(offset + int(batch[0]), activations)
                        emb_file.write(offset + int(batch[0]), embeddings)
                        bar.update(len(images) * world.size)
            for written in files.values():
                for file in written:
                    if file is not None:
                        file.close()
            if world.is_main:
                for folder in (emb_tmp, act_tmp):
                    np.save(folder / f"{subset}_labels.npy", np.asarray(labels, dtype=np.int64))
            shapes[subset] = {"images": count}
        if world.is_main:
            meta = {**(meta or {}), "subsets": shapes}
            if views:  # absent by default: the default cache stays byte-identical to earlier ones
                meta |= {"views": views, "augment": list(augment), "seed": seed}
            write_json(meta, emb_tmp / "meta.json")
            act_meta: dict[str, Any] = {"cut": trunk.cut, "layout": trunk.layout, "dtype": dtype}
            if not train_activations:
                act_meta["train_streamed"] = True
            write_json({**act_meta, "shape": list(act_shape), **meta}, act_tmp / "meta.json")


@contextmanager
def shared_atomic_path(final: Path, world: World) -> Iterator[Path]:
    """`io.atomic_path` for a folder every rank writes into: rank 0 creates it and, once every
    rank is done, moves it into place (or removes it on failure); the others only write."""
    if not world.is_main:
        yield Path(str(world.broadcast(None)))
        world.barrier()  # every rank has written
        world.barrier()  # rank 0 has moved the folder into place
        return
    with atomic_path(final, folder=True) as tmp:
        tmp.mkdir(parents=True)
        world.broadcast(str(tmp))
        yield tmp
        world.barrier()
    world.barrier()


def _shared_npy(
    path: Path, shape: tuple[int, ...], dtype: str, *, world: World, rows: int
) -> NpyRows:
    """The file created by rank 0, then opened by every rank."""
    if world.is_main:
        NpyRows(path, rows, shape, dtype).close()
    world.barrier()
    return NpyRows(path, rows, shape, dtype, create=False)


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
    """Fail before any work when what the stage and DVC will write (`needed` bytes) cannot fit
    on the disk it goes to."""
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise FeatureCacheError(
            f"the feature cache and DVC's copy of it need {_gib(needed)} in {folder}/ but only "
            f"{_gib(free)} is free there: free space, `dvc config cache.type hardlink` (no copy), "
            "or lower data.image_size or unfreeze fewer blocks (finetune.unfreeze)"
        )


def dvc_copies(config: Path = Path(".dvc/config")) -> int:
    """How many times the cache lands on disk: twice when DVC copies outputs into .dvc/cache
    (its default on file systems without reflinks), once when it links them (cache.type)."""
    try:
        text = config.read_text(encoding="utf-8")
    except OSError:
        return 2
    section, kinds = "", ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("["):
            section = stripped.strip("[]").strip()
        elif section == "cache" and stripped.replace(" ", "").startswith("type="):
            kinds = stripped.split("=", 1)[1]
    linked = {kind.strip() for kind in kinds.split(",") if kind.strip()}
    return 1 if linked and linked <= {"hardlink", "symlink"} else 2


def _gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB"


# numpy has no bfloat16: its bits are stored as uint16 (read back in batches.py)
STORED_DTYPES = {"float32": "<f4", "float16": "<f2", "bfloat16": "<u2"}


class NpyRows:
    """An .npy file of known shape, written batch by batch at each batch's own row offset: by one
    process, or by every rank of a DDP group into the one file (no gather through rank 0).

    Plain writes leave the bytes to the OS page cache; filling a writable memmap instead would
    keep every written page resident in this process, so its RSS would grow with the dataset.
    """

    def __init__(
        self,
        path: Path,
        rows: int,
        shape: tuple[int, ...],
        dtype: str = "float32",
        create: bool = True,
    ) -> None:
        self.rows, self.shape, self.dtype = rows, shape, dtype
        header = {"descr": STORED_DTYPES[dtype], "fortran_order": False, "shape": (rows, *shape)}
        buffer = io.BytesIO()
        np.lib.format.write_array_header_2_0(buffer, header)
        self.data_start = buffer.tell()
        self.row_bytes = math.prod(shape) * np.dtype(STORED_DTYPES[dtype]).itemsize
        if create:  # the whole file at once (sparse until written), so any rank may fill any row
            with path.open("wb") as handle:
                handle.write(buffer.getvalue())
                handle.truncate(self.data_start + rows * self.row_bytes)
        self.handle = path.open("r+b")

    def write(self, first_row: int, batch: torch.Tensor) -> None:
        if tuple(batch.shape[1:]) != self.shape or first_row + len(batch) > self.rows:
            raise ValueError(f"batch of shape {tuple(batch.shape)} does not fit {self.shape}")
        values = batch.detach().to("cpu", getattr(torch, self.dtype)).contiguous()
        if self.dtype == "bfloat16":
            values = values.view(torch.int16)
        self.handle.seek(self.data_start + first_row * self.row_bytes)
        self.handle.write(values.numpy().tobytes())

    def close(self) -> None:
        self.handle.close()


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
    params: Params,
    split: pd.DataFrame,
    embeddings_dir: Path,
    activations_dir: Path,
    world: World = SINGLE,
) -> dict[str, Any]:
    """The features stage: build the frozen trunk the params describe and cache its outputs."""
    from twophase.datasets import class_names  # pandas, 0.3 s: training imports this module

    seed_everything(params.seed)
    device = world.device_for(params.device)
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
        world=world,
    )
    return {**meta, "cut": cut}
