"""Images from disk as normalised tensors, the way the pretrained weights expect.

An image is asked for by its index (the eval transform) or by `(index, *draw)` (the training
augmentation, seeded by the dataset's seed, the index and the draw): the same key gives the same
pixels in any process, with any number of DataLoader workers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from twophase.batches import BatchOrder
from twophase.decode import load_rgb
from twophase.model import Preprocessing


def eval_transform(image_size: int, prep: Preprocessing) -> Callable[[Image.Image], torch.Tensor]:
    """Resize the short side to `resize_ratio * image_size`, centre-crop, normalise."""
    from torchvision.transforms import v2  # torchvision: imported only where images are decoded

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


def train_transform(
    image_size: int, prep: Preprocessing, augment: Sequence[str]
) -> Callable[[Image.Image], torch.Tensor]:
    """The eval transform with the named augmentations (params.AUGMENTATIONS), in that order.

    random_resized_crop replaces resize + centre crop (torchvision's defaults: scale 0.08-1,
    ratio 3/4-4/3, at the weights' size); colour and policy operations (trivial_augment,
    rand_augment) run on uint8 pixels, before normalisation, and random_erasing on the
    normalised tensor (erased pixels are 0: the mean), as torchvision's classification
    reference and timm do. Both take torchvision's default settings (RandAugment: 2 operations
    at magnitude 9, at the weights' interpolation; RandomErasing: probability 0.5, 2-33 % of
    the image).
    """
    from torchvision.transforms import v2  # as above

    interpolation = v2.InterpolationMode(prep.interpolation)
    steps: list[Callable[..., torch.Tensor]] = [v2.PILToTensor()]
    if "random_resized_crop" in augment:
        steps.append(v2.RandomResizedCrop(image_size, interpolation=interpolation, antialias=True))
    else:
        resize = round(image_size * prep.resize_ratio)
        steps += [v2.Resize(resize, interpolation, antialias=True), v2.CenterCrop(image_size)]
    if "horizontal_flip" in augment:
        steps.append(v2.RandomHorizontalFlip())
    if "color_jitter" in augment:
        steps.append(v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4))
    if "trivial_augment" in augment:
        steps.append(v2.TrivialAugmentWide(interpolation=interpolation))
    if "rand_augment" in augment:
        steps.append(v2.RandAugment(interpolation=interpolation))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(prep.mean), list(prep.std))]
    if "random_erasing" in augment:
        steps.append(v2.RandomErasing())
    transform: Callable[[Image.Image], torch.Tensor] = v2.Compose(steps)
    return transform


ImageKey = int | tuple[int, ...]


class ImageDataset(Dataset[tuple[torch.Tensor, int]]):
    """`dataset[i]`: image i on the eval transform; `dataset[(i, *draw)]`: image i augmented,
    the random draws seeded by (seed, i, *draw) whatever process asks."""

    def __init__(
        self,
        paths: Sequence[str],
        labels: Sequence[int],
        image_size: int,
        prep: Preprocessing,
        augment: Sequence[str] = (),
        seed: int = 0,
    ) -> None:
        self.paths = list(paths)
        self.labels = [int(label) for label in labels]
        self.transform = eval_transform(image_size, prep)
        self.augmented = train_transform(image_size, prep, augment) if augment else None
        self.seed = seed
        self.min_side = round(image_size * prep.resize_ratio)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: ImageKey) -> tuple[torch.Tensor, int]:
        index, draw = (key[0], key[1:]) if isinstance(key, tuple) else (int(key), ())
        image = load_rgb(self.paths[index], self.min_side)
        if not draw or self.augmented is None:
            return self.transform(image), self.labels[index]
        entropy = np.random.SeedSequence([self.seed, index, *draw]).generate_state(2)
        with torch.random.fork_rng(devices=[]):  # the caller's RNG stream stays untouched
            torch.manual_seed(int(entropy[0]) << 32 | int(entropy[1]))
            return self.augmented(image), self.labels[index]


class DrawOrder:
    """Batches of `(index, *draw, epoch)` keys in `order`'s batches: a fresh augmentation of
    every image each epoch, reproducible from the seed. `set_epoch` names the epoch."""

    def __init__(self, order: BatchOrder | Sequence[np.ndarray], *draw: int) -> None:
        self.order, self.draw, self.epoch = order, draw, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[tuple[int, ...]]]:
        for batch in self.order:
            yield [(int(i), *self.draw, self.epoch) for i in batch]

    def __len__(self) -> int:
        return len(self.order)


Order = BatchOrder | DrawOrder | Sequence[np.ndarray]  # batches of image indices or keys


class ImageBatches:
    """Streamed batches of decoded images in the given order, decoded by `num_workers`
    processes (kept for the next epoch) into pinned memory on CUDA, two batches ahead.

    With a `DrawOrder`, `set_epoch` gives every image a new augmentation that epoch."""

    def __init__(self, dataset: ImageDataset, order: Order, num_workers: int = 0) -> None:
        self.order = order
        self.loader: DataLoader[tuple[torch.Tensor, int]] = DataLoader(
            dataset,
            batch_sampler=order,  # type: ignore[arg-type]
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
            prefetch_factor=2 if num_workers > 0 else None,
            # its own generator: iterating must not consume the global RNG dropout draws from
            generator=torch.Generator().manual_seed(0),
            pin_memory=torch.cuda.is_available(),
        )

    def set_epoch(self, epoch: int) -> None:
        if isinstance(self.order, DrawOrder):
            self.order.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)
