"""The features stage: the frozen trunk run once over every image, its outputs cached.

What the cache holds and how it is written and read is cache.py's; what the trunk computes is
network.py's (`FrozenTrunk`). This module decodes the images, runs the trunk over them in the
batches of one process (every rank its share under DDP) and hands each batch to the cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm import tqdm

from twophase import cache, tta
from twophase.backbones import ArchError, block_names, describe
from twophase.batches import BatchOrder
from twophase.cache import FeatureCacheError, NpyRows
from twophase.distributed import SINGLE, World
from twophase.images import DrawOrder, ImageBatches, ImageDataset
from twophase.model import (
    Preprocessing,
    build_model,
    classifier_in_features,
    model_kwargs,
    preprocessing,
)
from twophase.network import FrozenTrunk, check_tail, resolve_cut
from twophase.params import Params, ParamsError
from twophase.runtime import autocast, autocast_dtype, seed_everything

if TYPE_CHECKING:  # pandas: imported only where the split is read, never by training
    import pandas as pd

SUBSETS = ("train", "val", "test")
FLIPPED_SUBSETS = ("val", "test")  # mirrored too with evaluate.tta: flip (never the training split)
CACHED_VIEW = 0  # the draw tag of cached views; streamed phase 2 draws with its own tag


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
    tta_mode: str = "none",
    tta_dir: Path | None = None,
    world: World = SINGLE,
) -> None:
    """Run the frozen trunk over every image once (and over `views` augmented views of every
    training image) and write both cache folders atomically.

    `train_activations=False` leaves out the training split's activations (phase 2 streams it).
    Given `tta_dir`, the TTA folder is written too: with `tta_mode` flip, the trunk also runs
    over the mirror of every val and test image, decoded once for both passes.
    Under DDP, rank r runs batches r, r + world, ... and writes their rows in place; the
    batches are those of one process, so the files are bitwise the same.
    """
    if tta_mode != "none" and tta_dir is None:
        raise ValueError(f"test-time augmentation {tta_mode!r} needs a folder to cache it in")
    # outside inference mode: parameters converted inside it could never train again
    trunk.to(device).to(memory_format=torch.channels_last).eval()
    flipped = FLIPPED_SUBSETS if tta_mode == "flip" else ()
    shapes = cache.output_shapes(trunk, image_size, device)
    if world.is_main:
        train_rows = len(subsets["train"][1]) if "train" in subsets else 0
        flip_rows = sum(len(subsets[name][1]) for name in flipped if name in subsets)
        rows = sum(len(labels) for _, labels in subsets.values()) + views * train_rows
        act_rows = rows - (0 if train_activations else (views + 1) * train_rows)
        cache.check_room(
            activations_dir.parent,
            shapes,
            dtype,
            rows + flip_rows,
            act_rows + flip_rows,
            backbone_state,
        )
    with (
        cache.writing(embeddings_dir, activations_dir, shapes, dtype, world, tta_dir) as writer,
        torch.inference_mode(),
    ):
        if backbone_state is not None:
            writer.backbone(backbone_state)
        counts: dict[str, Any] = {}
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
                files[stem] = writer.arrays(stem, in_file, keep_acts)
            # the mirrored images' outputs, computed alongside the plain view from the same pixels
            mirror = writer.flipped(subset, count) if subset in flipped else None
            for stem, view in passes:
                act_file, emb_file = files[stem]
                draws = DrawOrder(mine, CACHED_VIEW, view) if view else mine
                offset = count * (view - 1) if view else 0
                desc = f"features {subset}" + (f" view {view}/{views}" if view else "")
                with tqdm(
                    total=count, desc=desc, unit="img", disable=None if world.is_main else True
                ) as bar:
                    loaded = ImageBatches(dataset, draws, num_workers)
                    for batch, (images, _) in zip(mine, loaded, strict=True):
                        images = images.to(device, non_blocking=True)
                        images = images.contiguous(memory_format=torch.channels_last)
                        with autocast(device, amp_dtype):
                            activations, embeddings = trunk(images)
                        if act_file is not None:
                            act_file.write(offset + int(batch[0]), activations)
                        emb_file.write(offset + int(batch[0]), embeddings)
                        if mirror is not None and not view:
                            flip_act_file, flip_emb_file = mirror
                            mirrored = tta.mirrored(images)
                            mirrored = mirrored.contiguous(memory_format=torch.channels_last)
                            with autocast(device, amp_dtype):
                                activations, embeddings = trunk(mirrored)
                            flip_act_file.write(int(batch[0]), activations)
                            flip_emb_file.write(int(batch[0]), embeddings)
                        bar.update(len(images) * world.size)
            for written in [*files.values(), *([mirror] if mirror is not None else [])]:
                for file in written:
                    if file is not None:
                        file.close()
            writer.labels(subset, labels)
            counts[subset] = {"images": count}
        meta = {**(meta or {}), "subsets": counts}
        if views:  # absent by default: the default cache stays byte-identical to earlier ones
            meta |= {"views": views, "augment": list(augment), "seed": seed}
        act_meta: dict[str, Any] = {"cut": trunk.cut, "layout": trunk.layout, "dtype": dtype}
        if not train_activations:
            act_meta["train_streamed"] = True
        writer.metas(meta, act_meta)
        tta_counts = {name: counts[name] for name in flipped if name in counts}
        writer.tta_meta({"tta": tta_mode, **({"subsets": tta_counts} if flipped else {})})


def extract_features(
    params: Params,
    split: pd.DataFrame,
    embeddings_dir: Path,
    activations_dir: Path,
    world: World = SINGLE,
    tta_dir: Path | None = None,
) -> dict[str, Any]:
    """The features stage: build the frozen trunk the params describe and cache its outputs
    (and, given `tta_dir`, the outputs on the mirrored images `evaluate.tta` asks for)."""
    from twophase.datasets import class_names  # pandas: imported only where the split is read

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
        tta_mode=params.evaluate.tta,
        tta_dir=tta_dir,
        world=world,
    )
    return {**meta, "cut": cut}
