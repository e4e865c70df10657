"""Test helpers: tiny real image files in the layouts the loaders expect."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

PROJECT = Path(__file__).resolve().parent.parent


def docs_block(page: str, heading: str) -> str:
    """The first Python block after `heading` in docs/<page>: the code the docs show, as run."""
    text = (PROJECT / "docs" / page).read_text()
    section = text[text.index(heading) :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)  # type: ignore[union-attr]


def write_image(
    path: Path, seed: int, size: tuple[int, int] = (20, 16), fmt: str = "JPEG", mode: str = "RGB"
) -> Path:
    """A small random image that real decoders read (JPEG by default, like real datasets)."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
    pixels = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    image = Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels)
    image.save(path, format=fmt)
    return path


def make_imagefolder(
    root: Path,
    classes: Iterable[str] = ("cat", "dog"),
    train: int = 6,
    test: int = 2,
    test_name: str = "test",
) -> Path:
    seed = 0
    for name in classes:
        for split, count in (("train", train), (test_name, test)):
            for i in range(count):
                seed += 1
                write_image(root / split / name / f"{name}_{i}.jpg", seed)
    return root
