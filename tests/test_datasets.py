"""Dataset loading through torchvision's own classes, on tiny fakes in their exact layouts."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision

from tests.helpers import make_imagefolder, write_image
from twophase.datasets import (
    TORCHVISION_SOURCES,
    DatasetError,
    build_index,
    class_names,
    fetch_dataset,
    fetch_weights,
)
from twophase.model import WeightsError, build_model, weights_enum


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def fake_pet(root: Path) -> Path:
    base = root / "oxford-iiit-pet"
    ids = {
        "trainval": ["Abyssinian_1", "Abyssinian_2", "american_bulldog_1", "american_bulldog_2"],
        "test": ["Abyssinian_3", "american_bulldog_3"],
    }
    for split, names in ids.items():
        lines = []
        for i, image_id in enumerate(names):
            write_image(base / "images" / f"{image_id}.jpg", seed=i)
            label = 1 if image_id.startswith("Abyssinian") else 2
            lines.append(f"{image_id} {label} {label} 1")
        (base / "annotations").mkdir(parents=True, exist_ok=True)
        (base / "annotations" / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def test_oxford_pet_indexes_trainval_and_test_with_class_names(tmp_path: Path) -> None:
    index = build_index("oxford_iiit_pet", fake_pet(tmp_path))
    assert list(index.columns) == ["path", "label", "class_name", "split"]
    assert (index["split"] == "train").sum() == 4 and (index["split"] == "test").sum() == 2
    assert class_names(index) == ["Abyssinian", "American Bulldog"]
    assert all(Path(p).is_file() for p in index["path"])


def fake_flowers102(root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from scipy.io import savemat

    base = root / "flowers-102"
    for i in range(1, 10):
        write_image(base / "jpg" / f"image_{i:05d}.jpg", seed=i)
    savemat(base / "imagelabels.mat", {"labels": np.array([1, 2, 3] * 3)})
    savemat(
        base / "setid.mat",
        {"trnid": np.array([1, 2, 3]), "valid": np.array([4, 5, 6]), "tstid": np.array([7, 8, 9])},
    )
    # The real checksums cannot match fake files: point the check at ours, the layout stays real.
    files = dict(torchvision.datasets.Flowers102._file_dict)
    files["label"] = ("imagelabels.mat", md5(base / "imagelabels.mat"))
    files["setid"] = ("setid.mat", md5(base / "setid.mat"))
    monkeypatch.setattr(torchvision.datasets.Flowers102, "_file_dict", files)
    return root


def fake_dtd(root: Path, monkeypatch: pytest.MonkeyPatch | None = None) -> Path:
    base = root / "dtd" / "dtd"
    splits = {
        "train1": ["banded/b_1.jpg", "dotted/d_1.jpg"],
        "val1": ["banded/b_2.jpg", "dotted/d_2.jpg"],
        "test1": ["banded/b_3.jpg", "dotted/d_3.jpg"],
    }
    (base / "labels").mkdir(parents=True)
    for i, (name, files) in enumerate(splits.items()):
        for j, rel in enumerate(files):
            write_image(base / "images" / rel, seed=10 * i + j)
        (base / "labels" / f"{name}.txt").write_text("\n".join(files) + "\n")
    return root


def fake_fgvc_aircraft(root: Path, monkeypatch: pytest.MonkeyPatch | None = None) -> Path:
    data = root / "fgvc-aircraft-2013b" / "data"
    data.mkdir(parents=True)
    (data / "variants.txt").write_text("707-320\nA300B4\n")
    entries = {
        "trainval": [("1000001", "707-320"), ("1000002", "A300B4"), ("1000003", "A300B4")],
        "test": [("1000004", "707-320"), ("1000005", "A300B4")],
    }
    for split, rows in entries.items():
        for image_id, _ in rows:
            write_image(data / "images" / f"{image_id}.jpg", seed=int(image_id) % 97)
        (data / f"images_variant_{split}.txt").write_text("".join(f"{i} {v}\n" for i, v in rows))
    return root


def _fake_food101(root: Path, monkeypatch: pytest.MonkeyPatch | None = None) -> Path:
    base = root / "food-101"
    meta = {
        "train": {"apple_pie": ["apple_pie/1", "apple_pie/2"], "ramen": ["ramen/3"]},
        "test": {"apple_pie": ["apple_pie/4"], "ramen": ["ramen/5"]},
    }
    (base / "meta").mkdir(parents=True)
    for split, classes in meta.items():
        for rels in classes.values():
            for rel in rels:
                write_image(base / "images" / f"{rel}.jpg", seed=int(rel[-1]))
        (base / "meta" / f"{split}.json").write_text(json.dumps(classes))
    return root


FAKES = {
    "oxford_iiit_pet": lambda root, monkeypatch: fake_pet(root),
    "flowers102": fake_flowers102,
    "dtd": fake_dtd,
    "fgvc_aircraft": fake_fgvc_aircraft,
    "food101": _fake_food101,
}


def test_flowers102_uses_train_and_val_as_the_training_split(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    index = build_index("flowers102", fake_flowers102(tmp_path, monkeypatch))
    assert (index["split"] == "train").sum() == 6 and (index["split"] == "test").sum() == 3
    assert class_names(index)[:2] == ["pink primrose", "hard-leaved pocket orchid"]


def test_dtd_reads_partition_1(tmp_path: Path) -> None:
    index = build_index("dtd", fake_dtd(tmp_path))
    assert (index["split"] == "train").sum() == 4
    assert class_names(index) == ["banded", "dotted"]


def test_fgvc_aircraft_reads_variants(tmp_path: Path) -> None:
    index = build_index("fgvc_aircraft", fake_fgvc_aircraft(tmp_path))
    assert class_names(index) == ["707-320", "A300B4"]
    assert index.groupby("split").size().to_dict() == {"test": 2, "train": 3}


def test_food101_reads_meta_json(tmp_path: Path) -> None:
    index = build_index("food101", _fake_food101(tmp_path))
    assert class_names(index) == ["apple_pie", "ramen"]
    assert (index["split"] == "test").sum() == 2


def test_offline_download_fails_fast_naming_what_to_fetch_and_where(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as caught:
        fetch_dataset("oxford_iiit_pet", tmp_path / "raw", tmp_path / "downloads")
    message = str(caught.value)
    assert "could not fetch Oxford-IIIT Pet" in message
    assert "make digits" in message
    assert "<data.root>/oxford-iiit-pet/images.tar.gz" in message
    assert "\n" not in message


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


def test_food101_archive_placed_where_the_message_says_is_used_and_left_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torchvision's Food101 downloads into root itself and reads root/food-101/{images,meta}."""
    source = tmp_path / "source"
    _fake_food101(source)
    root = tmp_path / "raw"
    message = TORCHVISION_SOURCES["food101"].manual(root)
    assert f"place {root / 'food-101.tar.gz'} " in message
    root.mkdir()
    with tarfile.open(root / "food-101.tar.gz", "w:gz") as tar:
        tar.add(source / "food-101", arcname="food-101")
    monkeypatch.setattr(torchvision.datasets.Food101, "_MD5", md5(root / "food-101.tar.gz"))
    before = _snapshot(root)
    downloads = tmp_path / "downloads"
    assert fetch_dataset("food101", root, downloads) == downloads
    index = build_index("food101", root, downloads)
    assert len(index) == 5 and all(p.startswith(str(downloads)) for p in index["path"])
    assert _snapshot(root) == before, "the user's folder is only read"
    assert not list(downloads.glob("*.tar.gz")), "the extracted archive is not kept twice"


@pytest.mark.parametrize("dataset", sorted(TORCHVISION_SOURCES))
def test_extracted_folders_placed_where_the_message_says_are_indexed_in_place(
    dataset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "raw"
    FAKES[dataset](root, monkeypatch)
    source = TORCHVISION_SOURCES[dataset]
    for folder in source.extracted:
        assert f"{root / folder}/" in source.manual(root)
        assert (root / folder).is_dir(), folder
    downloads = tmp_path / "downloads"
    assert fetch_dataset(dataset, root, downloads) == root, "no download when it is in place"
    assert len(build_index(dataset, root, downloads)) > 0


def test_pre_placed_archives_are_used_without_network(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = fake_pet(tmp_path / "source") / "oxford-iiit-pet"
    root = tmp_path / "raw"
    target = tmp_path / "raw" / "oxford-iiit-pet"
    target.mkdir(parents=True)
    resources = []
    for folder, (url, _) in zip(
        ("images", "annotations"), torchvision.datasets.OxfordIIITPet._RESOURCES, strict=True
    ):
        archive = target / url.rsplit("/", 1)[1]
        with tarfile.open(archive, "w:gz") as tar:
            tar.add(source / folder, arcname=folder)
        resources.append((url, md5(archive)))
    monkeypatch.setattr(torchvision.datasets.OxfordIIITPet, "_RESOURCES", tuple(resources))
    before = _snapshot(root)
    fetch_dataset("oxford_iiit_pet", root, tmp_path / "downloads")
    index = build_index("oxford_iiit_pet", root, tmp_path / "downloads")
    assert len(index) == 6
    assert _snapshot(root) == before


def test_digits_export_in_imagefolder_layout(in_tmp: Path) -> None:
    fetch_dataset("digits", Path("data/raw"), Path("data/downloads"))
    index = build_index("digits", Path("data/raw"), Path("data/downloads"))
    assert len(index) == 1797
    assert class_names(index) == [str(d) for d in range(10)]
    assert index.groupby("split").size().to_dict() == {"test": 450, "train": 1347}
    assert not Path(index["path"][0]).is_absolute(), "paths inside the project stay relative"
    fetch_dataset("digits", Path("data/raw"), Path("data/downloads"))
    again = build_index("digits", Path("data/raw"), Path("data/downloads"))
    assert again.equals(index), "export is deterministic"


def test_imagefolder_accepts_val_as_the_test_split(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "f", test_name="val")
    index = build_index("imagefolder", root)
    assert set(index["split"]) == {"train", "test"}
    assert class_names(index) == ["cat", "dog"]


def test_imagefolder_skips_non_image_files_with_a_warning(
    imagefolder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("notes.txt", "a.pdf", "b.doc", "c.xls"):
        (imagefolder / "train" / "cat" / name).write_text("not an image")
    index = build_index("imagefolder", imagefolder)
    (line,) = capsys.readouterr().err.splitlines()  # one line per folder
    assert line == (
        f"twophase: warning: {imagefolder / 'train'}: skipped 4 file(s) that are not images by "
        "their extension: cat/a.pdf, cat/b.doc, cat/c.xls, ... and 1 more"
    )
    assert not index["path"].str.endswith(".txt").any()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda root: __import__("shutil").rmtree(root / "train" / "dog"), "1 class folder"),
        (lambda root: [p.unlink() for p in (root / "train" / "dog").iterdir()], "no readable"),
        (lambda root: (root / "test" / "bird").mkdir(), "classes not in train/: bird"),
        (lambda root: __import__("shutil").rmtree(root / "test"), "must hold train/<class>/"),
    ],
)
def test_malformed_imagefolder_is_a_clear_error(imagefolder: Path, damage, message: str) -> None:
    damage(imagefolder)
    with pytest.raises(DatasetError, match=message):
        build_index("imagefolder", imagefolder)


def test_missing_imagefolder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="is not a folder"):
        build_index("imagefolder", tmp_path / "nowhere")


@pytest.fixture
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_missing_weights_offline_name_the_file_and_where_to_put_it(torch_home: Path) -> None:
    with pytest.raises(DatasetError) as caught:
        fetch_weights("resnet18", "IMAGENET1K_V1")
    assert "resnet18-f37072fd.pth" in str(caught.value)
    assert str(torch_home / "checkpoints") in str(caught.value)


def test_weights_copied_into_the_hub_cache_load_offline(torch_home: Path) -> None:
    torch.manual_seed(0)
    state = torchvision.models.resnet18().state_dict()
    (torch_home / "checkpoints").mkdir(parents=True)
    torch.save(state, torch_home / "checkpoints" / "resnet18-f37072fd.pth")
    assert "IMAGENET1K_V1" in fetch_weights("resnet18", "IMAGENET1K_V1")
    backbone = build_model("resnet18", "IMAGENET1K_V1", 224)
    assert torch.equal(backbone.state_dict()["conv1.weight"], state["conv1.weight"])


def test_local_state_dict_file(tmp_path: Path) -> None:
    torch.manual_seed(1)
    state = torchvision.models.resnet18().state_dict()
    torch.save({"state_dict": state}, tmp_path / "mine.pt")
    backbone = build_model("resnet18", str(tmp_path / "mine.pt"), 224)
    assert torch.equal(
        backbone.state_dict()["layer4.1.bn2.running_var"], state["layer4.1.bn2.running_var"]
    )
    torch.save(torchvision.models.resnet34().state_dict(), tmp_path / "other.pt")
    with pytest.raises(WeightsError, match="does not fit resnet18"):
        build_model("resnet18", str(tmp_path / "other.pt"), 224)
    with pytest.raises(WeightsError, match="does not exist"):
        build_model("resnet18", str(tmp_path / "absent.pt"), 224)


def test_unknown_weights_name_lists_the_valid_ones() -> None:
    with pytest.raises(WeightsError, match="IMAGENET1K_V1"):
        weights_enum("resnet18", "IMAGENET_V9")
    assert weights_enum("resnet18", "none") is None
    assert weights_enum("resnet50", "DEFAULT") is not None


def test_index_round_trips_through_csv(tmp_path: Path, imagefolder: Path) -> None:
    from twophase.datasets import read_index
    from twophase.io import write_csv

    index = build_index("imagefolder", imagefolder)
    write_csv(index, tmp_path / "index.csv")
    pd.testing.assert_frame_equal(read_index(tmp_path / "index.csv"), index)


# Folder names pandas reads as NaN by default, and names that collide as numbers
AWKWARD_CLASSES = ("NA", "None", "null", "nan", "NULL", "01", "1", "1.0")


def test_class_names_stay_the_folder_names_through_index_split_and_export(
    tmp_path: Path,
) -> None:
    from twophase.datasets import read_index
    from twophase.io import write_csv
    from twophase.predict import export_metadata
    from twophase.split import split_index

    root = make_imagefolder(tmp_path / "folder", AWKWARD_CLASSES, train=2, test=1)
    write_csv(build_index("imagefolder", root), tmp_path / "index.csv")
    split = split_index(read_index(tmp_path / "index.csv"), 0.5, seed=0)
    write_csv(split, tmp_path / "split.csv")
    reread = read_index(tmp_path / "split.csv")  # as the features and evaluate stages read it
    names = class_names(reread)
    assert names == sorted(AWKWARD_CLASSES)
    assert reread["class_name"].tolist() == split["class_name"].tolist()
    folders = [Path(path).parent.name for path in reread["path"]]
    assert folders == reread["class_name"].tolist()
    metadata = export_metadata(
        {"arch": "resnet18", "class_names": names, "image_size": 32, "preprocessing": {}}
    )

    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    assert json.loads(metadata["twophase.class_names"], parse_constant=refuse) == names


def test_index_csv_cells_pandas_would_read_as_missing_stay_strings(tmp_path: Path) -> None:
    from twophase.datasets import read_index

    (tmp_path / "index.csv").write_text(
        "path,label,class_name,split\nN/A,0,N/A,train\nNULL,1,01,train\n#N/A,2,1,test\n"
    )
    index = read_index(tmp_path / "index.csv")
    assert index["path"].tolist() == ["N/A", "NULL", "#N/A"]
    assert index["class_name"].tolist() == ["N/A", "01", "1"]
    assert index["label"].tolist() == [0, 1, 2]


def test_a_folder_of_class_folders_gets_a_stable_stratified_test_split(tmp_path: Path) -> None:
    """The layout most people have: <root>/<class>/*, no train/ or test/. The test split is
    chosen by a hash of each image's path, not by the seed: every experiment (every seed) is
    scored on the same images, and adding a photo moves at most one other."""
    from twophase.split import split_index

    make_imagefolder(tmp_path / "made", classes=("cat", "dog", "owl"), train=10, test=0)
    root = tmp_path / "made" / "train"  # cat/, dog/, owl/ directly under root
    (root / ".ipynb_checkpoints").mkdir()  # hidden folders are no classes
    write_image(root / "cat" / ".thumbnails" / "0.jpg", seed=99)  # nor samples inside a class
    write_image(root / "dog" / "@eaDir" / "0.jpg" / "SYNOFILE_THUMB_M.jpg", seed=98)
    (root / "notes.md").write_text("a file beside the class folders")
    index = build_index("imagefolder", root, test_ratio=0.2)
    assert class_names(index) == ["cat", "dog", "owl"] and len(index) == 30
    assert not index["path"].str.contains("thumb|eaDir", case=False).any()
    counts = index.groupby(["split", "class_name"]).size().unstack()
    assert counts.loc["test"].tolist() == [2, 2, 2]  # stratified: 20 % of each class
    test = set(index.loc[index["split"] == "test", "path"])
    for seed in (0, 1):  # the val carve follows the seed; the test split does not
        split = split_index(index, val_ratio=0.25, seed=seed)
        assert set(split.loc[split["subset"] == "test", "path"]) == test
        assert split["path"].is_unique and (split["subset"] == "val").sum() == 6
    write_image(root / "cat" / "new.jpg", seed=100)
    again = build_index("imagefolder", root, test_ratio=0.2)
    assert len(set(again.loc[again["split"] == "test", "path"]) ^ test) <= 2


@pytest.mark.parametrize("dataset", ["imagefolder", "digits"])
def test_the_download_folder_is_never_left_empty(tmp_path: Path, dataset: str) -> None:
    """DVC warns "'data/downloads' is empty" on every command when an output folder is empty:
    with your own images nothing is fetched, and a note says so."""
    from twophase.datasets import NOTE, fetch_dataset

    downloads = tmp_path / "downloads"
    fetch_dataset(dataset, make_imagefolder(tmp_path / "mine"), downloads)
    note = (downloads / NOTE).read_text()
    assert note.startswith(f"{dataset}: ")
    if dataset == "imagefolder":
        assert sorted(p.name for p in downloads.iterdir()) == [NOTE]
        assert "read from data.root" in note
