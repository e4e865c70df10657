"""The feature cache: two folders of .npy files, written by the features stage, read by both phases
and by evaluation (and a third, for test-time augmentation, read by evaluation alone).

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
The TTA folder (data/tta, its own output: the phases never depend on it, and turning test-time
augmentation on changes no byte of the other two) holds `meta.json` (`tta`: the mode) and, with
`evaluate.tta: flip`, `<subset>_flip_embeddings.npy` and `<subset>_flip_activations.npy` of the
val and test splits: the trunk's outputs on the mirrored images (`tta.mirrored`), row for row as
the plain arrays; `load_flipped` reads them.
Arrays are appended to their files batch by batch (`CacheWriter`), so memory stays flat as the
dataset grows, and are read back memory-mapped.
"""

from __future__ import annotations

import io
import math
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from torch import nn

from twophase.errors import TwophaseError
from twophase.io import atomic_path, read_json, write_json
from twophase.params import ParamsError

BACKBONE = "backbone.pt"
# numpy has no bfloat16: its bits are stored as uint16 (read back in batches.py)
STORED_DTYPES = {"float32": "<f4", "float16": "<f2", "bfloat16": "<u2"}


class Ranks(Protocol):
    """The processes writing the cache (a `distributed.World`): rank 0 creates the folders and
    files, every rank writes its rows into them."""

    @property
    def is_main(self) -> bool: ...

    def barrier(self) -> None: ...

    def broadcast(self, value: object) -> object: ...


class FeatureCacheError(TwophaseError):
    """The feature cache cannot be written, or does not fit the params."""


def check_room(
    folder: Path,
    shapes: tuple[tuple[int, ...], tuple[int, ...]],
    dtype: str,
    rows: int,
    activation_rows: int,
    backbone_state: dict[str, torch.Tensor] | None,
) -> None:
    """Fail before any work when the cache of `rows` embeddings, `activation_rows` activations
    (per-row `shapes`) and the backbone, times DVC's copies of it, cannot fit in `folder`."""
    act_shape, emb_shape = shapes
    act_bytes = math.prod(act_shape) * np.dtype(STORED_DTYPES[dtype]).itemsize
    emb_bytes = 4 * math.prod(emb_shape)
    backbone_bytes = sum(v.numel() * v.element_size() for v in (backbone_state or {}).values())
    cache_bytes = activation_rows * act_bytes + rows * emb_bytes + backbone_bytes
    check_free_space(folder, cache_bytes * dvc_copies())


class CacheWriter:
    """Both cache folders while they are written (in temporary folders every rank writes into).

    Rank 0 alone writes the small files (labels, backbone, metas); every rank writes its own
    rows of the arrays.
    """

    def __init__(
        self,
        embeddings: Path,
        activations: Path,
        shapes: tuple[tuple[int, ...], tuple[int, ...]],
        dtype: str,
        world: Ranks,
        tta: Path | None = None,
    ) -> None:
        self.embeddings, self.activations, self.tta = embeddings, activations, tta
        self.act_shape, self.emb_shape = shapes
        self.dtype, self.world = dtype, world

    def backbone(self, state: dict[str, torch.Tensor]) -> None:
        if self.world.is_main:
            torch.save({k: v.clone() for k, v in state.items()}, self.embeddings / BACKBONE)

    def arrays(self, stem: str, rows: int, activations: bool) -> tuple[NpyRows | None, NpyRows]:
        """`<stem>_activations.npy` (None without `activations`) and `<stem>_embeddings.npy`,
        of `rows` rows each, open for every rank to write its rows into."""
        act = self._npy(self.activations / f"{stem}_activations.npy", rows) if activations else None
        return act, self._npy(self.embeddings / f"{stem}_embeddings.npy", rows, embeddings=True)

    def flipped(self, subset: str, rows: int) -> tuple[NpyRows, NpyRows]:
        """`<subset>_flip_activations.npy` and `<subset>_flip_embeddings.npy` in the TTA folder,
        of `rows` rows each: the trunk's outputs on the subset's mirrored images."""
        if self.tta is None:
            raise ValueError("the cache is written without a TTA folder")
        act = self._npy(self.tta / f"{subset}_flip_activations.npy", rows)
        return act, self._npy(self.tta / f"{subset}_flip_embeddings.npy", rows, embeddings=True)

    def _npy(self, path: Path, rows: int, embeddings: bool = False) -> NpyRows:
        """An array of activations (the cache's dtype) or embeddings (float32) at `path`."""
        if embeddings:
            return _shared_npy(path, self.emb_shape, "float32", world=self.world, rows=rows)
        return _shared_npy(path, self.act_shape, self.dtype, world=self.world, rows=rows)

    def labels(self, subset: str, labels: Sequence[int]) -> None:
        if self.world.is_main:
            for folder in (self.embeddings, self.activations):
                np.save(folder / f"{subset}_labels.npy", np.asarray(labels, dtype=np.int64))

    def metas(self, meta: dict[str, Any], activations_meta: dict[str, Any]) -> None:
        """`meta.json` of both folders: the activations' adds its own keys and the shape."""
        if self.world.is_main:
            write_json(meta, self.embeddings / "meta.json")
            act_meta = {**activations_meta, "shape": list(self.act_shape), **meta}
            write_json(act_meta, self.activations / "meta.json")

    def tta_meta(self, meta: dict[str, Any]) -> None:
        """`meta.json` of the TTA folder."""
        if self.world.is_main and self.tta is not None:
            write_json(meta, self.tta / "meta.json")


@contextmanager
def writing(
    embeddings_dir: Path,
    activations_dir: Path,
    shapes: tuple[tuple[int, ...], tuple[int, ...]],
    dtype: str,
    world: Ranks,
    tta_dir: Path | None = None,
) -> Iterator[CacheWriter]:
    """Both cache folders (and the TTA folder, given `tta_dir`), written atomically: in place
    once every rank is done, untouched on failure. `shapes`: per-row shapes of (activations,
    embeddings)."""
    with (
        shared_atomic_path(embeddings_dir, world) as emb_tmp,
        shared_atomic_path(activations_dir, world) as act_tmp,
        shared_atomic_path(tta_dir, world) if tta_dir is not None else nullcontext() as tta_tmp,
    ):
        yield CacheWriter(emb_tmp, act_tmp, shapes, dtype, world, tta_tmp)


@contextmanager
def shared_atomic_path(final: Path, world: Ranks) -> Iterator[Path]:
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
    path: Path, shape: tuple[int, ...], dtype: str, *, world: Ranks, rows: int
) -> NpyRows:
    """The file created by rank 0, then opened by every rank."""
    if world.is_main:
        NpyRows(path, rows, shape, dtype).close()
    world.barrier()
    return NpyRows(path, rows, shape, dtype, create=False)


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


def output_shapes(
    trunk: nn.Module, image_size: int, device: torch.device
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Per-image shapes of a `network.FrozenTrunk`'s (activations NHWC, embedding), from one blank
    image."""
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
    (its default on file systems without reflinks), once when it links them (cache.type, as
    `dvc config` or `dvc config --local` set it: config.local wins)."""
    kinds = ""
    for path in (config, config.with_name("config.local")):
        try:
            text = path.read_text(encoding="utf-8")
        except OSError:
            continue
        section = ""
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


def load_flipped(tta_dir: Path, subset: str, kind: str) -> np.ndarray:
    """The trunk's outputs on a subset's mirrored images, of `kind` "embeddings" or
    "activations", memory-mapped, row for row as the plain arrays."""
    flipped: np.ndarray = np.load(tta_dir / f"{subset}_flip_{kind}.npy", mmap_mode="r")
    return flipped


def load_meta(features_dir: Path) -> dict[str, Any]:
    meta: dict[str, Any] = read_json(features_dir / "meta.json")
    return meta
