"""Bad params and bad data fail early with one clear line, or are handled as documented."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from tests.helpers import make_imagefolder, write_image
from twophase.datasets import DatasetError, build_index, fetch_dataset
from twophase.decode import load_rgb, unreadable_reason
from twophase.params import Params, ParamsError, load_params, parse_params, read_yaml
from twophase.split import split_index

# --- params.yaml thrown at the loader: accepted, or the project's own error, never a traceback

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 300), st.floats(allow_nan=True), st.text(max_size=12)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3)
    ),
    max_leaves=8,
)
known_keys = st.sampled_from(
    [
        "seed",
        "device",
        "precision",
        "data",
        "model",
        "features",
        "train_transfer",
        "finetune",
        "lr",
        "epochs",
        "unfreeze",
        "dataset",
        "dense_units",
        "dropout",
        "val_ratio",
        "weights",
    ]
)
# the autouse no_network fixture is harmless across examples
QUIET = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]

documents = st.dictionaries(st.one_of(known_keys, st.text(max_size=8)), values, max_size=5)


@settings(max_examples=300, deadline=None, suppress_health_check=QUIET)
@given(raw=st.one_of(values, documents))
def test_random_params_are_accepted_or_rejected_with_a_params_error(raw: object) -> None:
    try:
        params = parse_params(raw)
    except ParamsError as err:
        assert "\n" not in str(err)
    else:
        assert isinstance(params, Params)


@settings(max_examples=150, deadline=None, suppress_health_check=QUIET)
@given(
    section=st.sampled_from(["train_transfer", "finetune"]),
    key=st.sampled_from(["lr", "epochs", "patience", "batch_size"]),
    value=values,
)
def test_random_values_in_real_sections(section: str, key: str, value: object) -> None:
    try:
        parse_params({section: {key: value}})
    except ParamsError as err:
        assert str(err).startswith(f"{section}.{key}")


@settings(max_examples=200, deadline=None, suppress_health_check=QUIET)
@given(text=st.text(max_size=200))
def test_arbitrary_text_files(tmp_path_factory: pytest.TempPathFactory, text: str) -> None:
    path = tmp_path_factory.mktemp("p") / "params.yaml"
    path.write_text(text, encoding="utf-8")
    with contextlib.suppress(ParamsError):
        load_params(path)


def test_mutated_project_params_file(tmp_path: Path) -> None:
    raw = read_yaml((Path(__file__).parents[1] / "params.yaml").read_text())
    raw["finetune"]["unfreeze"] = ["layer4", "all"]
    with pytest.raises(ParamsError, match=r"^finetune.unfreeze: \['layer4', 'all'\]"):
        parse_params(raw)


# --- bad images


def save(path: Path, image: Image.Image, **kwargs: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


@pytest.mark.parametrize(
    ("make", "mode"),
    [
        (lambda p: save(p.with_suffix(".png"), Image.new("L", (9, 7), 128)), "grayscale"),
        (
            lambda p: save(p.with_suffix(".jpg"), Image.new("CMYK", (9, 7), (0, 255, 0, 0))),
            "CMYK JPEG",
        ),
        (lambda p: save(p.with_suffix(".png"), Image.new("RGBA", (9, 7), (255, 0, 0, 0))), "RGBA"),
        (lambda p: save(p.with_suffix(".png"), Image.new("P", (9, 7), 3)), "palette"),
        (
            lambda p: save(
                p.with_suffix(".png"), Image.fromarray(np.full((7, 9), 65535, dtype=np.uint16))
            ),
            "16-bit",
        ),
    ],
)
def test_unusual_image_modes_become_8_bit_rgb(tmp_path: Path, make, mode: str) -> None:
    path = make(tmp_path / "image")
    assert unreadable_reason(path) is None, mode
    image = load_rgb(path)
    assert image.mode == "RGB" and image.size == (9, 7), mode


def test_transparent_pixels_are_composited_over_white(tmp_path: Path) -> None:
    path = save(tmp_path / "clear.png", Image.new("RGBA", (4, 4), (255, 0, 0, 0)))
    assert load_rgb(path).getpixel((0, 0)) == (255, 255, 255)


def test_16_bit_maps_full_range_onto_8_bit(tmp_path: Path) -> None:
    path = save(tmp_path / "deep.png", Image.fromarray(np.full((2, 2), 65535, dtype=np.uint16)))
    assert load_rgb(path).getpixel((0, 0)) == (255, 255, 255)


def truncated_jpeg(path: Path) -> Path:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
        buffer, format="JPEG"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return path


def test_truncated_and_garbage_files_are_detected(tmp_path: Path) -> None:
    assert "unreadable" in unreadable_reason(truncated_jpeg(tmp_path / "half.jpg"))
    (tmp_path / "junk.jpg").write_bytes(b"this is not a jpeg")
    assert "unreadable" in unreadable_reason(tmp_path / "junk.jpg")


def test_huge_images_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_image(tmp_path / "big.jpg", seed=1, size=(64, 64))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64x64 is then over twice the limit
    assert "too large" in unreadable_reason(path)


def test_large_jpegs_decode_at_reduced_scale(tmp_path: Path) -> None:
    path = write_image(tmp_path / "photo.jpg", seed=2, size=(1600, 1200))
    assert min(load_rgb(path, min_side=150).size) >= 150
    assert load_rgb(path, min_side=150).size == (200, 150)  # 1/8 scale: 8x fewer rows decoded


def test_imagefolder_skips_unreadable_images_with_a_warning(
    imagefolder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    truncated_jpeg(imagefolder / "train" / "cat" / "broken.jpg")
    (imagefolder / "train" / "dog" / "fake.png").write_bytes(b"\x89PNG not really")
    index = build_index("imagefolder", imagefolder)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and all(line.startswith("twophase: warning: ") for line in lines)
    assert "skipped 1 image(s) that cannot be used (broken.jpg: unreadable" in lines[0]
    assert "fake.png: unreadable" in lines[1] and ".py" not in "".join(lines)
    assert not index["path"].str.contains("broken|fake").any()
    assert len(index) == 16


def test_class_left_without_readable_images_is_an_error(imagefolder: Path) -> None:
    for path in (imagefolder / "train" / "dog").iterdir():
        path.write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="holds no readable images"):
        build_index("imagefolder", imagefolder)


def test_interrupted_extraction_is_reported(tmp_path: Path) -> None:
    from tests.test_datasets import fake_pet

    root = fake_pet(tmp_path)
    next((root / "oxford-iiit-pet" / "images").iterdir()).unlink()
    with pytest.raises(DatasetError, match=r"1 of 6 images .* missing.*interrupted"):
        build_index("oxford_iiit_pet", root)


def test_val_ratio_that_empties_a_class_is_an_error(tmp_path: Path) -> None:
    index = build_index("imagefolder", make_imagefolder(tmp_path / "f", train=2))
    with pytest.raises(DatasetError, match=r"^data.val_ratio: 0.9 gives"):
        split_index(index, 0.9, seed=0)


def test_class_with_a_single_image_cannot_be_split(tmp_path: Path) -> None:
    index = build_index("imagefolder", make_imagefolder(tmp_path / "f", train=1))
    with pytest.raises(DatasetError, match=r"^data.val_ratio: cannot carve .* fewer than 2 images"):
        split_index(index, 0.2, seed=0)


def test_changing_only_the_seed_changes_the_split(tmp_path: Path) -> None:
    index = build_index("imagefolder", make_imagefolder(tmp_path / "f", train=10))
    first, again = split_index(index, 0.3, seed=1), split_index(index, 0.3, seed=1)
    other = split_index(index, 0.3, seed=2)
    assert first.equals(again)
    assert not first.equals(other)
    assert first["subset"].value_counts().to_dict() == other["subset"].value_counts().to_dict()


def test_damaged_pre_placed_archive_is_reported_not_used(tmp_path: Path) -> None:
    folder = tmp_path / "oxford-iiit-pet"
    folder.mkdir()
    (folder / "images.tar.gz").write_bytes(b"half a download")
    with pytest.raises(DatasetError, match=r"images.tar.gz in .* failed torchvision's checksum"):
        fetch_dataset("oxford_iiit_pet", tmp_path, tmp_path / "downloads")
    assert (folder / "images.tar.gz").read_bytes() == b"half a download", "never touched"
