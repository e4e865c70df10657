"""The two training phases: what trains, on which cached inputs, what each checkpoint holds.

Phase 1 (transfer) trains only the head, on the cached pooled embeddings.
Phase 2 (fine-tune) starts from phase 1's checkpoint and trains the unfrozen blocks and the head,
on the cached activations entering the first unfrozen block. Its starting weights are validated
first and stay a candidate, so phase 2 never hands back a model worse on validation than phase 1.
Both call the same `train.fit`. When the cache holds augmented views (`features.views`), every
epoch of either phase trains on one view of each image, drawn per epoch. With
`finetune.input: images`, phase 2 trains on the training images themselves, decoded and freshly
augmented (`data.augment`) every epoch, the frozen part run without gradient; validation stays
on the cached activations, which the streamed network would compute identically.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from twophase import cache
from twophase.backbones import Family, block_names, describe
from twophase.batches import ArrayBatches, Batches, BatchOrder
from twophase.batches import array_batches as batches
from twophase.cache import FeatureCacheError
from twophase.checkpoint import load_checkpoint, preprocessing_of, save_checkpoint
from twophase.distributed import SINGLE, World, global_batchnorm
from twophase.images import DrawOrder, ImageBatches, ImageDataset
from twophase.io import atomic_path
from twophase.mixing import Mixing
from twophase.model import build_head
from twophase.network import Streamed, Tail, discriminative_groups, resolve_cut, set_trainable
from twophase.params import FinetuneParams, Params, ParamsError, PhaseParams
from twophase.runtime import autocast_dtype, seed_everything
from twophase.train import EpochStats, FitResult, balanced_class_weights, fit, fit_linear_probe

if TYPE_CHECKING:  # pandas: only for type hints, the training stages never import it
    import pandas as pd


def write_history(rows: list[EpochStats], path: Path) -> None:
    """plots/<phase>/history.csv: one row per epoch, floats rounded to 6 decimals (numpy's
    rounding, as pandas' `round` wrote them before)."""
    columns = list(EpochStats.__dataclass_fields__)
    lines = [",".join(columns)]
    for row in rows:
        values = asdict(row)
        lines.append(",".join(_csv_value(values[column]) for column in columns))
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _csv_value(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    return str(float(np.round(value, 6)))


def class_weights(
    phase: PhaseParams, section: str, labels: np.ndarray, class_names: list[str]
) -> torch.Tensor | None:
    """The phase's class weights from its whole training label array, or None (unweighted)."""
    if phase.class_weights == "none":
        return None
    return balanced_class_weights(labels, class_names, f"{section}.class_weights")


@dataclass(frozen=True)
class TransferInputs:
    """What phase 1 trains, on what: the new head and the cached embeddings (in memory)."""

    meta: dict[str, Any]
    head: nn.Sequential
    train: tuple[np.ndarray, np.ndarray]
    val: tuple[np.ndarray, np.ndarray]
    train_views: np.ndarray | None

    def batches(self, params: Params, world: World = SINGLE) -> tuple[ArrayBatches, ArrayBatches]:
        """(training, validation) batches of this rank, in the phase's seeded order."""
        phase = params.train_transfer
        sharded = partial(batches, rank=world.rank, ranks=world.size)
        return (
            sharded(*self.train, phase.batch_size, True, params.seed, views=self.train_views),
            sharded(*self.val, phase.batch_size, False, params.seed),
        )


def transfer_inputs(params: Params, embeddings_dir: Path) -> TransferInputs:
    """Phase 1's head, freshly initialised (from the seeded random state), and its inputs."""
    meta = cache.load_meta(embeddings_dir)
    train = cache.load_embeddings(embeddings_dir, "train", in_memory=True)
    val = cache.load_embeddings(embeddings_dir, "val", in_memory=True)
    train_views = cache.load_views(embeddings_dir, "embeddings", in_memory=True)
    head = build_head(
        meta["embedding_dim"],
        params.model.dense_units,
        params.model.dropout,
        len(meta["class_names"]),
    )
    return TransferInputs(meta, head, train, val, train_views)


def train_transfer(
    params: Params,
    embeddings_dir: Path,
    checkpoint_path: Path,
    history_path: Path,
    world: World = SINGLE,
) -> FitResult:
    """Phase 1: the head alone, on cached embeddings (held in memory: they are small).
    Under DDP, rank 0 alone writes the history and the checkpoint."""
    seed_everything(params.seed)
    device = world.device_for(params.device)
    inputs = transfer_inputs(params, embeddings_dir)
    meta, head = inputs.meta, inputs.head
    # The backbone comes from the cache, not torchvision: this stage stays quick to start.
    backbone = torch.load(embeddings_dir / cache.BACKBONE, map_location="cpu", weights_only=True)
    phase = params.train_transfer
    weights = class_weights(phase, "train_transfer", inputs.train[1], meta["class_names"])
    if phase.solver == "lbfgs":  # a linear probe: full-batch L-BFGS, L2 chosen on val
        result = fit_linear_probe(
            head, inputs.train, inputs.val, device, seed=params.seed, class_weights=weights
        )
        if world.is_main:
            write_history(result.history, history_path)
    else:
        result = fit(
            head,
            inputs.batches(params, world),
            phase,
            world=world,
            device=device,
            amp_dtype=autocast_dtype(device, params.precision),
            seed=params.seed,
            desc="train_transfer",
            class_weights=weights,
            mixing=Mixing(phase.mixup),
        )
        if world.is_main:
            write_history(result.history, history_path)
    if not world.is_main:
        return result
    classifier = meta["classifier"]
    head_state = {f"{classifier}.{key}": value for key, value in head.cpu().state_dict().items()}
    save_checkpoint(
        {**backbone, **head_state},
        checkpoint_path,
        phase="transfer",
        params=params,
        features_meta=meta,
        reads="embeddings",
        cut=None,
        summary=result.checkpoint_summary(result.history[-1].epoch),
    )
    return result


STREAMED_DRAW = 1  # the draw tag of streamed augmentations (features.CACHED_VIEW is 0)


def finetune(
    params: Params,
    activations_dir: Path,
    transfer_checkpoint: Path,
    checkpoint_path: Path,
    history_path: Path,
    split: pd.DataFrame | None = None,
    world: World = SINGLE,
) -> FitResult:
    """Phase 2: unfrozen blocks + head from phase 1's weights, on cached activations, or on the
    training images of `split` when `finetune.input` is images. Under DDP, rank 0 alone writes.

    Epochs are numbered on from phase 1's last epoch, so both phases share one axis; the
    starting weights are validated as that last epoch and kept unless an epoch beats them.
    """
    seed_everything(params.seed)
    device = world.device_for(params.device)
    begin = finetune_start(params, activations_dir, transfer_checkpoint)
    model, start, blocks, cut = begin.model, begin.checkpoint, begin.blocks, begin.cut
    phase = params.finetune
    features_meta: dict[str, Any] = {**start, "embedding_dim": start["head"]["in_features"]}
    if phase.epochs == 0:  # phase 2 skipped: its checkpoint is phase 1's network
        if world.is_main:
            write_history([], history_path)
            print(
                "finetune: finetune.epochs is 0: phase 2 is SKIPPED, its checkpoint is phase 1's "
                "network and every phase-2 result equals phase 1's"
            )
        result = FitResult(
            best_epoch=start["best_epoch"],
            best_val_loss=start["best_val_loss"],
            best_val_acc=start["best_val_acc"],
        )
        reads, cut = "embeddings", None
    else:
        tail = trainable_tail(params, begin, world)
        nhwc = begin.meta["layout"] == "nchw"
        val = cache.load_activations(activations_dir, "val")
        model_in_training, train_batches, train_labels = training_inputs(
            params, begin, tail, activations_dir, split, device, world
        )
        rows = len(train_labels)
        sharded = partial(batches, rank=world.rank, ranks=world.size)
        weights = class_weights(phase, "finetune", train_labels, begin.meta["class_names"])
        try:
            result = fit(
                model_in_training,
                (train_batches, sharded(*val, phase.batch_size, False, params.seed, nhwc=nhwc)),
                phase,
                discriminative_groups(tail, blocks, phase.lr_decay),
                world,
                device=device,
                amp_dtype=autocast_dtype(device, params.precision),
                seed=params.seed,
                start_epoch=start["last_epoch"],
                val_model=tail,
                desc="finetune",
                class_weights=weights,
                mixing=Mixing(phase.mixup, phase.cutmix),
            )
        except ValueError as err:
            raise last_batch_error(phase, rows, err) from None
        if world.is_main:
            write_history(result.history, history_path)
        if result.kept_starting_weights and world.is_main:
            print("finetune: no epoch beat phase 1 on validation loss; kept phase 1's weights")
        reads = "activations"
    if not world.is_main:
        return result
    save_checkpoint(
        model.cpu().state_dict(),
        checkpoint_path,
        phase="finetune",
        params=params,
        features_meta=features_meta,
        reads=reads,
        cut=cut,
        summary=result.checkpoint_summary(
            result.history[-1].epoch if result.history else start["last_epoch"]
        ),
    )
    return result


@dataclass(frozen=True)
class FinetuneStart:
    """Phase 2's starting point: phase 1's network and checkpoint, its blocks, the cut (the
    first unfrozen block) and the activation cache's metadata, checked to hold that cut."""

    model: nn.Module
    checkpoint: dict[str, Any]
    family: Family
    blocks: list[str]
    cut: str | None
    meta: dict[str, Any]


def finetune_start(
    params: Params, activations_dir: Path, transfer_checkpoint: Path
) -> FinetuneStart:
    """Phase 1's network, loaded to train (which draws from the seeded random state)."""
    model, start = load_checkpoint(
        transfer_checkpoint, initialise=True, drop_path=params.model.drop_path
    )
    family = describe(model, start["arch"])
    blocks = block_names(model, family)
    cut = resolve_cut(start["arch"], blocks, params.finetune.unfreeze)
    meta = cache.load_meta(activations_dir)
    if meta["cut"] != cut:
        raise FeatureCacheError(
            f"finetune.unfreeze starts at {cut or 'the input'} but the feature cache in "
            f"{activations_dir} holds the input of {meta['cut'] or 'the network'}: rerun the "
            "features stage (dvc repro)"
        )
    return FinetuneStart(model, start, family, blocks, cut, meta)


def trainable_tail(params: Params, begin: FinetuneStart, world: World = SINGLE) -> Tail:
    """The unfrozen blocks and the head, the only part that gets gradients; with
    `finetune.batchnorm: train` under DDP, their BatchNorm takes global batch statistics."""
    phase = params.finetune
    tail = Tail(begin.model, begin.family, begin.cut, freeze_batchnorm=phase.batchnorm == "frozen")
    set_trainable(begin.model, tail)
    if world.distributed and phase.batchnorm == "train":  # global batch statistics
        trained = [m for t in tail.trainable_modules() for m in t.modules()]
        global_batchnorm(begin.model, {id(m) for m in trained if isinstance(m, _BatchNorm)})
    return tail


def training_inputs(
    params: Params,
    begin: FinetuneStart,
    tail: Tail,
    activations_dir: Path,
    split: pd.DataFrame | None,
    device: torch.device,
    world: World = SINGLE,
) -> tuple[nn.Module, Batches, np.ndarray]:
    """(the module that trains, its training batches, the labels of every training image, all
    ranks' alike): the tail on the cached activations, or the streamed network on the training
    images of `split` with `finetune.input: images`."""
    if params.finetune.input == "images":
        if split is None:
            raise ValueError("finetune.input: images needs the split")
        streamed = streamed_batches(params, split, begin.checkpoint, world)
        labels = split.loc[split["subset"] == "train", "label"].to_numpy()
        return Streamed(tail), streamed, labels
    if begin.meta.get("train_streamed"):
        raise FeatureCacheError(
            f"finetune.input is cached but {activations_dir} holds no training activations "
            "(it was made for finetune.input: images): rerun the features stage (dvc repro)"
        )
    nhwc = begin.meta["layout"] == "nchw"
    cached = cached_batches(params, activations_dir, nhwc, device, world)
    return tail, cached, np.asarray(cached.labels)


def last_batch_error(phase: FinetuneParams, rows: int, err: ValueError) -> Exception:
    """BatchNorm in train mode cannot normalise a channel holding one value: a last batch of one
    image at a 1 x 1 feature map. Said as the param to change, else `err` as it was."""
    if "Expected more than 1 value per channel" not in str(err):
        return err
    return ParamsError(
        f"finetune.batch_size: {phase.batch_size} leaves a last batch of {rows % phase.batch_size}"
        f" of the {rows} training images, whose BatchNorm statistics cannot be computed "
        "(finetune.batchnorm: train): choose another batch size"
    )


BLOCK_WINDOW = 8  # finetune.shuffle: blocks shuffles rows among this many blocks of a batch


def cached_batches(
    params: Params, activations_dir: Path, nhwc: bool, device: torch.device, world: World
) -> ArrayBatches:
    """Phase 2's training batches from the cache: held on the GPU when they fit there, else
    read ahead by `compute.num_workers` processes into pinned memory."""
    phase = params.finetune
    train = cache.load_activations(activations_dir, "train")
    views = cache.load_views(activations_dir, "activations")
    size = train[0].nbytes + (0 if views is None else views.nbytes)
    if phase.shuffle == "full" and world.is_main:
        warn_if_larger_than_memory(size)
    train_batches = batches(
        *train,
        phase.batch_size,
        True,
        params.seed,
        nhwc,
        views,
        rank=world.rank,
        ranks=world.size,
        window=BLOCK_WINDOW if phase.shuffle == "blocks" else 0,
        num_workers=params.compute.num_workers,
        pin_memory=device.type == "cuda",
    )
    if device.type == "cuda" and size < 0.5 * torch.cuda.mem_get_info(device)[0]:
        train_batches.resident(device)
    return train_batches


def available_memory() -> int | None:
    """Bytes of memory available without swapping: Linux's MemAvailable (what the page cache
    would give up), else the free pages; None where neither can be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # no such name on this platform
        return None


def warn_if_larger_than_memory(size: int) -> None:
    available = available_memory()
    if available is not None and size > available:
        print(
            f"finetune: the training cache ({size / 2**30:.1f} GiB) is larger than the free "
            f"memory ({available / 2**30:.1f} GiB): with finetune.shuffle: full every batch "
            "is random disk reads; finetune.shuffle: blocks reads it in runs"
        )


def streamed_batches(
    params: Params, split: pd.DataFrame, checkpoint: dict[str, Any], world: World = SINGLE
) -> ImageBatches:
    """The training images in the cached path's batch order, augmented anew each epoch."""
    train = split[split["subset"] == "train"]
    dataset = ImageDataset(
        train["path"].tolist(),
        train["label"].tolist(),
        checkpoint["image_size"],
        preprocessing_of(checkpoint),
        params.data.augment,
        params.seed,
    )
    order = BatchOrder(
        len(dataset), params.finetune.batch_size, True, params.seed, world.rank, world.size
    )
    return ImageBatches(dataset, DrawOrder(order, STREAMED_DRAW), params.features.num_workers)


def finetune_summary(result: FitResult) -> dict[str, float | int | bool]:
    """metrics/finetune.json: the training summary, whether phase 1's weights were kept, and
    whether phase 2 was skipped (finetune.epochs: 0)."""
    skipped = result.start_epoch is None
    kept = result.kept_starting_weights or skipped
    return {**result.summary(), "kept_phase1_weights": kept, "skipped": skipped}
