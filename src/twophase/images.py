"""Reading images from disk into normalised tensors, the way the pretrained weights expect."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from twophase.model import Preprocessing


def eval_transform(image_size: int, prep: Preprocessing) -> v2.Compose:
    """Resize the short side to `resize_ratio * image_size`, centre-crop, normalise."""
    return v2.Compose(
        [
            v2.PILToTensor(),
            v2.Resize(round(image_size * prep.resize_ratio), antialias=True),
            v2.CenterCrop(image_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(prep.mean), std=list(prep.std)),
        ]
    )


def load_rgb(path: str | Path, min_side: int | None = None) -> Image.Image:
    """Open any common image file as 8-bit RGB.

    With `min_side`, JPEGs are decoded at a reduced scale (1/2, 1/4, 1/8) that still leaves the
    short side at least `min_side` pixels: far cheaper than decoding a large photo in full.
    """
    with Image.open(path) as opened:
        img: Image.Image = opened
        if min_side is not None and img.format == "JPEG":
            width, height = img.size
            scale = max(min_side / min(width, height), 1 / 8)
            opened.draft(None, (max(1, round(width * scale)), max(1, round(height * scale))))
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            array = np.asarray(img, dtype=np.float64)
            peak = array.max() or 1.0
            img = Image.fromarray((array * (255.0 / peak)).astype(np.uint8))
        if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return img.convert("RGB")


class ImageDataset(Dataset[tuple[torch.Tensor, int]]):
    def __init__(
        self, paths: Sequence[str], labels: Sequence[int], image_size: int, prep: Preprocessing
    ) -> None:
        self.paths = list(paths)
        self.labels = [int(label) for label in labels]
        self.transform = eval_transform(image_size, prep)
        self.min_side = round(image_size * prep.resize_ratio)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = load_rgb(self.paths[index], self.min_side)
        return self.transform(image), self.labels[index]


class BatchOrder:
    """Index batches for one epoch: a fresh seeded permutation per epoch, sorted within a batch.

    Sorting inside a batch changes nothing for the loss (a mean) but lets memory-mapped arrays
    be read front to back. Cached and streamed inputs share this order, hence the same batches.
    """

    def __init__(self, size: int, batch_size: int, shuffle: bool, seed: int = 0) -> None:
        self.size, self.batch_size, self.shuffle = size, batch_size, shuffle
        self.rng = np.random.default_rng(seed)

    def __iter__(self) -> Iterator[np.ndarray]:
        order = self.rng.permutation(self.size) if self.shuffle else np.arange(self.size)
        for start in range(0, self.size, self.batch_size):
            yield np.sort(order[start : start + self.batch_size])

    def __len__(self) -> int:
        return -(-self.size // self.batch_size)


class ArrayBatches:
    """(inputs, labels) batches from in-memory or memory-mapped arrays, re-iterable per epoch."""

    def __init__(self, inputs: np.ndarray, labels: np.ndarray, order: BatchOrder) -> None:
        self.inputs, self.labels, self.order = inputs, labels, order

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for idx in self.order:
            yield (
                torch.from_numpy(np.asarray(self.inputs[idx])),
                torch.from_numpy(np.asarray(self.labels[idx], dtype=np.int64)),
            )

    def __len__(self) -> int:
        return len(self.order)


def array_batches(
    inputs: np.ndarray, labels: np.ndarray, batch_size: int, shuffle: bool = False, seed: int = 0
) -> ArrayBatches:
    return ArrayBatches(inputs, labels, BatchOrder(len(labels), batch_size, shuffle, seed))


def image_batches(
    dataset: ImageDataset, order: BatchOrder, num_workers: int = 0
) -> DataLoader[tuple[torch.Tensor, int]]:
    """Streamed batches of decoded images in the given order (decoding in worker processes)."""
    return DataLoader(
        dataset,
        batch_sampler=order,  # type: ignore[arg-type]
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        # its own generator: iterating must not consume the global RNG that dropout draws from
        generator=torch.Generator().manual_seed(0),
        pin_memory=torch.cuda.is_available(),
    )
