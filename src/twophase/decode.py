"""Decoding any common image file into 8-bit RGB (PIL only: cheap to import)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps


def load_rgb(path: str | Path, min_side: int | None = None) -> Image.Image:
    """Open any common image file as 8-bit RGB, upright as its EXIF orientation says.

    With `min_side`, JPEGs are decoded at a reduced scale (1/2, 1/4, 1/8) that still leaves the
    short side at least `min_side` pixels: far cheaper than decoding a large photo in full.
    """
    with Image.open(path) as opened:
        img: Image.Image = opened
        if min_side is not None and img.format == "JPEG":
            # the stored size: turning upright swaps width and height at most, so the short
            # side (what `min_side` bounds) is the same before and after
            width, height = img.size
            scale = max(min_side / min(width, height), 1 / 8)
            opened.draft(None, (max(1, round(width * scale)), max(1, round(height * scale))))
        # cameras store photos as the sensor read them, with an EXIF tag saying how to turn
        # them upright, which PIL does not apply on its own; in place: no copy when upright
        ImageOps.exif_transpose(img, in_place=True)
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit: 0..65535 onto 0..255
            array = np.asarray(img, dtype=np.float64) / 257.0
            img = Image.fromarray(np.clip(array.round(), 0, 255).astype(np.uint8))
        if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return img.convert("RGB")


MAX_ASPECT = 50  # long side / short side: panoramas are 4-10, nothing a classifier reads is 50


def unreadable_reason(path: str | Path) -> str | None:
    """Why the image at `path` cannot be used (None when it decodes).

    JPEGs are decoded at 1/8 scale, which still reads every byte: truncation is caught cheaply.
    Images over twice PIL's decompression-bomb limit (about 179 megapixels) are refused, and so
    are strips longer than MAX_ASPECT times their width: resized to the model's short side, a
    tiny 1 x 100000 PNG would take gigabytes.
    """
    try:
        with Image.open(path) as img:
            width, height = img.size
            if max(width, height) > MAX_ASPECT * max(1, min(width, height)):
                return (
                    f"too elongated ({width} x {height} pixels; at most {MAX_ASPECT}:1, as "
                    "resizing its short side to the model's would make it enormous)"
                )
            img.draft(None, (max(1, width // 8), max(1, height // 8)))
            img.load()
    except Image.DecompressionBombError:
        return "too large (over PIL's decompression-bomb limit)"
    except (OSError, SyntaxError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        return f"unreadable ({reason})"
    return None
