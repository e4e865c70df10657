"""Photos with an EXIF orientation are used upright on every path that decodes images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from tests.helpers import docs_block
from twophase.decode import load_rgb
from twophase.model import Preprocessing

DARK, BRIGHT = 30, 220
TRANSPOSED = (5, 6, 7, 8)  # the orientations that swap width and height


def sideways_photo(path: Path, orientation: int = 6, size: tuple[int, int] = (40, 20)) -> Path:
    """A JPEG stored as a camera stores it: left half dark, right half bright, and an EXIF tag
    saying how to turn it upright (6: turn 90 degrees clockwise, so the dark half ends on top)."""
    width, height = size
    pixels = np.full((height, width, 3), BRIGHT, dtype=np.uint8)
    pixels[:, : width // 2] = DARK
    exif = Image.Exif()
    exif[0x0112] = orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="JPEG", quality=95, exif=exif)
    return path


def upright(path: Path) -> np.ndarray:
    with Image.open(path) as opened:
        return np.asarray(ImageOps.exif_transpose(opened).convert("RGB"), dtype=np.int16)


def dark_on_top(pixels: np.ndarray) -> bool:
    """Whether `pixels` (rows first, any channel layout after) are dark above, bright below,
    the dividing row and the JPEG ringing next to it left out."""
    rows = pixels.shape[0]
    top, bottom = pixels[: rows * 2 // 5], pixels[rows - rows * 2 // 5 :]
    return bool(top.max() < bottom.min())


def test_load_rgb_turns_the_photo_upright(tmp_path: Path) -> None:
    path = sideways_photo(tmp_path / "photo.jpg")
    image = load_rgb(path)
    assert image.size == (20, 40)
    pixels = np.asarray(image, dtype=np.int16)
    assert np.abs(pixels - upright(path)).max() <= 2
    assert dark_on_top(pixels)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_load_rgb_draft_decoding_keeps_the_short_side_after_turning(
    tmp_path: Path, orientation: int
) -> None:
    path = sideways_photo(tmp_path / "photo.jpg", orientation, size=(400, 200))
    image = load_rgb(path, min_side=50)
    assert image.size == ((50, 100) if orientation in TRANSPOSED else (100, 50))  # 1/4 scale
    reference = Image.fromarray(upright(path).astype(np.uint8)).resize(image.size)
    difference = np.abs(np.asarray(image, np.int16) - np.asarray(reference, np.int16))
    assert np.percentile(difference, 95) <= 8  # the same picture, decoded at a quarter scale


def test_image_dataset_turns_photos_upright_for_features_and_streaming(tmp_path: Path) -> None:
    """ImageDataset decodes for the features stage, streamed phase 2 and predict."""
    from twophase.images import ImageDataset

    path = sideways_photo(tmp_path / "photo.jpg")
    plain = ImageDataset([str(path)], [0], 16, Preprocessing())
    tensor, _ = plain[0]
    reference = plain.transform(Image.fromarray(upright(path).astype(np.uint8)))
    assert torch.allclose(tensor, reference, atol=0.05)
    assert dark_on_top(tensor[0].numpy())
    # the augmented draw of streamed phase 2: a horizontal flip keeps dark above bright
    augmented = ImageDataset([str(path)], [0], 16, Preprocessing(), ["horizontal_flip"], seed=1)
    for draw in range(3):
        tensor, _ = augmented[(0, draw, 0)]
        assert dark_on_top(tensor[0].numpy()), draw


def test_predict_feeds_the_network_upright_photos(tmp_path: Path) -> None:
    from twophase.predict import predict_images

    class Recorder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[torch.Tensor] = []

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            self.seen.append(images.clone())
            return torch.zeros(len(images), 2)

    path = sideways_photo(tmp_path / "photo.jpg")
    model = Recorder()
    checkpoint = {"class_names": ["a", "b"], "image_size": 16, "preprocessing": {}}
    predict_images(model, checkpoint, [str(path)], device="cpu")
    assert dark_on_top(model.seen[0][0, 0].numpy())


def test_report_grid_shows_photos_upright(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from twophase.plots import plot_prediction_grid

    pasted: list[Image.Image] = []
    paste = Image.Image.paste

    def record(self: Image.Image, image: Image.Image, *args: object, **kwargs: object) -> None:
        pasted.append(image.copy())
        paste(self, image, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Image.Image, "paste", record)
    path = sideways_photo(tmp_path / "photo.jpg")
    plot_prediction_grid([str(path)], ["a"], ["a"], "grid", tmp_path / "grid.png")
    shown = pasted[0]
    assert shown.height == 2 * shown.width
    assert dark_on_top(np.asarray(shown))


def test_docs_preprocessing_snippet_turns_photos_upright_as_twophase_does(
    tmp_path: Path,
) -> None:
    """The docs' preprocessing for the exported model, run on a sideways photo."""
    import onnx

    from twophase.images import ImageDataset
    from twophase.predict import export_metadata

    snippet = docs_block("use-the-model.md", "## Preprocess an image without twophase")
    checkpoint = {"arch": "resnet18", "class_names": ["a", "b"], "image_size": 16}
    checkpoint["preprocessing"] = {"mean": (0.4, 0.5, 0.6), "std": (0.2, 0.3, 0.25)}
    model = onnx.helper.make_model(onnx.helper.make_graph([], "empty", [], []))
    for key, value in export_metadata(checkpoint).items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(tmp_path / "model.onnx"))
    photo = sideways_photo(tmp_path / "photo.jpg")
    namespace: dict[str, object] = {}
    code = snippet.replace("model.onnx", str(tmp_path / "model.onnx"))
    exec(code.replace("photo.jpg", str(photo)), namespace)
    batch = namespace["batch"]
    assert isinstance(batch, torch.Tensor) and batch.shape == (1, 3, 16, 16)
    prep = Preprocessing(**checkpoint["preprocessing"])  # type: ignore[arg-type]
    expected, _ = ImageDataset([str(photo)], [0], 16, prep)[0]
    assert torch.allclose(batch[0], expected, atol=1e-6)


def test_a_tiny_but_extreme_strip_is_refused_before_resizing_makes_it_huge(tmp_path: Path) -> None:
    """A 1 x 100000 PNG is a few hundred bytes and passes the pixel-count bomb check, but
    resizing its short side to 256 px would allocate about 20 GB."""
    from twophase.decode import unreadable_reason

    strip = tmp_path / "strip.png"
    Image.new("RGB", (1, 100_000)).save(strip)
    assert strip.stat().st_size < 2000
    reason = unreadable_reason(strip)
    assert reason is not None and reason.startswith("too elongated (1 x 100000 pixels")
    panorama = tmp_path / "panorama.png"
    Image.new("RGB", (400, 40)).save(panorama)  # 10:1 is a photo
    assert unreadable_reason(panorama) is None


@pytest.mark.parametrize("size", [7, 2049, 20000])
def test_image_size_has_bounds(size: int) -> None:
    from twophase.params import ParamsError, parse_params

    with pytest.raises(ParamsError, match=rf"^data\.image_size: {size} is not allowed"):
        parse_params({"data": {"image_size": size}})


def test_gifs_and_files_whose_extension_lies_are_indexed_and_decoded_by_content(
    tmp_path: Path,
) -> None:
    """Real datasets hold GIFs (first frame) and PNGs or GIFs named .jpg."""
    from twophase.datasets import build_index

    rng = np.random.default_rng(0)
    kinds = [("GIF", ".gif"), ("PNG", ".jpg"), ("GIF", ".jpg")]
    for split, count in (("train", 3), ("test", 1)):
        for name in ("cat", "dog"):
            folder = tmp_path / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
                fmt, ext = kinds[i]
                Image.fromarray(pixels).save(folder / f"{i}{ext}", format=fmt)
    index = build_index("imagefolder", tmp_path)
    assert len(index) == 8
    for path in index["path"]:
        image = load_rgb(path)
        assert image.mode == "RGB" and image.size == (16, 12), path
