"""Images from disk as normalised tensors, the way the pretrained weights expect."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from twophase.batches import BatchOrder
from twophase.decode import load_rgb
from twophase.model import Preprocessing


def eval_transform(image_size: int, prep: Preprocessing) -> Callable[[Image.Image], torch.Tensor]:
    """Resize the short side to `resize_ratio * image_size`, centre-crop, normalise."""
    from torchvision.transforms import v2  # torchvision takes seconds to import: only if needed

    transform: Callable[[Image.Image], torch.Tensor] = v2.Compose(
        [
            v2.PILToTensor(),
            v2.Resize(
                round(image_size * prep.resize_ratio),
                interpolation=v2.InterpolationMode(prep.interpolation),
                antialias=True,
            ),
            v2.CenterCrop(image_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(prep.mean), std=list(prep.std)),
        ]
    )
    return transform


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
