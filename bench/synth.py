"""A synthetic ImageFolder of photo-like JPEGs (~500x375 like Oxford-IIIT Pet) for benchmarks.

Smooth colour fields with shapes and grain decode like real photos (white noise would not: it
compresses badly and decodes slowly); a per-class tint gives the classifier something to learn.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def photo_like(rng: np.random.Generator, size: tuple[int, int], tint: np.ndarray) -> Image.Image:
    width, height = size
    coarse = rng.uniform(0, 255, size=(6, 8, 3)).astype(np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 8))):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        x1, y1 = x0 + rng.integers(30, 200), y0 + rng.integers(30, 200)
        draw.ellipse((x0, y0, x1, y1), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    image = image.filter(ImageFilter.GaussianBlur(2))
    pixels = np.asarray(image, dtype=np.float32) * 0.7 + tint * 0.3
    pixels += rng.normal(0, 6, size=pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def make_imagefolder(
    root: Path,
    images: int,
    classes: int = 4,
    test_share: float = 0.2,
    size: tuple[int, int] = (500, 375),
    seed: int = 0,
) -> Path:
    """`images` JPEGs split over classes, in root/train/<class>/ and root/test/<class>/."""
    rng = np.random.default_rng(seed)
    tints = rng.uniform(0, 255, size=(classes, 3)).astype(np.float32)
    for i in range(images):
        label = i % classes
        split = "test" if (i // classes) % round(1 / test_share) == 0 else "train"
        path = root / split / f"class_{label}" / f"img_{i:05d}.jpg"
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        jitter = (int(rng.integers(-40, 41)), int(rng.integers(-30, 31)))
        photo_like(rng, (size[0] + jitter[0], size[1] + jitter[1]), tints[label]).save(
            path, quality=90
        )
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("root", type=Path)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--classes", type=int, default=4)
    args = parser.parse_args()
    make_imagefolder(args.root, args.images, args.classes)


if __name__ == "__main__":
    main()
