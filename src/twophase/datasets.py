"""Getting a dataset onto disk and describing it with one dataset-agnostic index.

The index (data/index.csv) has one row per image: path, label, class_name, split ('train' or
'test', the dataset's official split). Every later stage reads only the index, never a dataset
class, so all datasets look alike from there on.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from twophase.decode import unreadable_reason
from twophase.errors import TwophaseError, copied_run_hint, first_few
from twophase.io import atomic_path

INDEX_COLUMNS = ["path", "label", "class_name", "split"]
IMAGE_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".png",
    ".gif",
    ".ppm",
    ".bmp",
    ".pgm",
    ".tif",
    ".tiff",
    ".webp",
)
NETWORK_TIMEOUT_S = 10.0
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")


class DatasetError(TwophaseError):
    """The dataset is missing, unreachable or malformed; the message says what to do."""


@dataclass(frozen=True)
class TorchvisionSource:
    """How one torchvision dataset class is asked for its official train and test splits.

    `archives` and `extracted` are where torchvision's class itself looks, relative to the root
    it is given (read from its source): the offline instructions name exactly these places.
    """

    title: str
    class_name: str
    folder: str  # what torchvision creates under root
    train_splits: tuple[str, ...]
    test_split: str
    archives: tuple[str, ...]  # downloaded files, relative to root
    extracted: tuple[str, ...]  # what torchvision reads once they are extracted
    extra: tuple[tuple[str, Any], ...] = ()

    def manual(self, root: Path) -> str:
        """Where to put the files by hand, in the words of one line."""
        archives = " and ".join(str(root / a) for a in self.archives)
        extracted = " and ".join(f"{root / e}/" for e in self.extracted)
        return f"place {archives} (or the extracted {extracted})"


TORCHVISION_SOURCES = {
    "oxford_iiit_pet": TorchvisionSource(
        "Oxford-IIIT Pet",
        "OxfordIIITPet",
        "oxford-iiit-pet",
        ("trainval",),
        "test",
        ("oxford-iiit-pet/images.tar.gz", "oxford-iiit-pet/annotations.tar.gz"),
        ("oxford-iiit-pet/images", "oxford-iiit-pet/annotations"),
        (("target_types", "category"),),
    ),
    "flowers102": TorchvisionSource(
        "Flowers102",
        "Flowers102",
        "flowers-102",
        ("train", "val"),
        "test",
        ("flowers-102/102flowers.tgz", "flowers-102/imagelabels.mat", "flowers-102/setid.mat"),
        ("flowers-102/jpg",),
    ),
    "dtd": TorchvisionSource(
        "DTD",
        "DTD",
        "dtd",
        ("train", "val"),
        "test",
        ("dtd/dtd-r1.0.1.tar.gz",),
        ("dtd/dtd/images", "dtd/dtd/labels"),
    ),
    "fgvc_aircraft": TorchvisionSource(
        "FGVC-Aircraft",
        "FGVCAircraft",
        "fgvc-aircraft-2013b",
        ("trainval",),
        "test",
        ("fgvc-aircraft-2013b.tar.gz",),
        ("fgvc-aircraft-2013b/data",),
        (("annotation_level", "variant"),),
    ),
    "food101": TorchvisionSource(
        "Food-101",
        "Food101",
        "food-101",
        ("train",),
        "test",
        ("food-101.tar.gz",),
        ("food-101/images", "food-101/meta"),
    ),
}


def fetch_dataset(dataset: str, root: Path, downloads: Path) -> Path | None:
    """The download stage's data part: make `dataset` readable; return where it now lives.

    `root` (data.root) is the user's folder and is only ever read. Anything this stage creates
    goes under `downloads`, a folder it alone writes: the digits export, and torchvision
    datasets that are not already extracted in `root` (archives the user placed in `root` are
    linked into `downloads`, checked and extracted there; otherwise they are downloaded).
    """
    downloads.mkdir(parents=True, exist_ok=True)
    if dataset == "digits":
        _note(downloads, "digits: scikit-learn's bundled digits, exported to digits/ as PNGs")
        return export_digits(downloads / "digits")
    if dataset not in TORCHVISION_SOURCES:
        _note(downloads, f"{dataset}: nothing to fetch; the images are read from data.root")
        return None
    source = TORCHVISION_SOURCES[dataset]
    if _opens(source, root):
        _note(downloads, f"{dataset}: nothing fetched; read from data.root, where it is extracted")
        return root
    _note(downloads, f"{dataset}: fetched and extracted here by torchvision")
    for relative in source.archives:
        placed, target = root / relative, downloads / relative
        if placed.is_file() and not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            if placed.name.endswith(ARCHIVE_SUFFIXES):  # large: linked, never copied or moved
                target.symlink_to(placed.resolve())
            else:
                shutil.copyfile(placed, target)
    try:
        _open_splits(source, downloads, download=True)
    finally:
        extracted = _opens(source, downloads)
        for relative in source.archives:  # once extracted, the archives are dead weight
            target = downloads / relative
            if target.is_symlink() or (extracted and target.name.endswith(ARCHIVE_SUFFIXES)):
                target.unlink(missing_ok=True)
    return downloads


NOTE = "ABOUT.txt"


def _note(downloads: Path, text: str) -> None:
    """What the download stage did, in a file: the folder is never empty (DVC warns about an
    empty output on every command), and whoever opens it reads why it holds what it holds."""
    with atomic_path(downloads / NOTE) as tmp:
        tmp.write_text(f"{text}\n", encoding="utf-8")


def build_index(
    dataset: str, root: Path, downloads: Path | None = None, test_ratio: float = 0.2
) -> pd.DataFrame:
    """Index `dataset`: from `root` (the user's folder) or what the download stage wrote."""
    if dataset in TORCHVISION_SOURCES:
        source = TORCHVISION_SOURCES[dataset]
        where = root if downloads is None or _opens(source, root) else downloads
        return index_torchvision(source, where)
    if dataset == "digits":
        if downloads is None:
            raise DatasetError("digits are exported by the download stage: run dvc repro")
        return index_imagefolder(downloads / "digits")
    if dataset == "imagefolder":
        return index_imagefolder(root, test_ratio=test_ratio)
    raise DatasetError(f"data.dataset: unknown dataset {dataset!r}")


@contextmanager
def network_timeout(seconds: float) -> Iterator[None]:
    """Fail a dead connection in seconds rather than the OS's minutes."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _opens(source: TorchvisionSource, root: Path) -> bool:
    """Whether torchvision finds the dataset extracted under `root` (no network, no writes)."""
    try:
        _open_splits(source, root, download=False)
    except DatasetError:
        return False
    return True


def _open_splits(source: TorchvisionSource, root: Path, download: bool) -> list[tuple[Any, str]]:
    import torchvision.datasets  # imported only here: imagefolder and digits never need it

    cls = getattr(torchvision.datasets, source.class_name)
    splits = [(name, "train") for name in source.train_splits] + [(source.test_split, "test")]
    opened = []
    for tv_split, split in splits:
        try:
            with network_timeout(NETWORK_TIMEOUT_S):
                ds = cls(str(root), split=tv_split, download=download, **dict(source.extra))
        except (OSError, RuntimeError) as err:  # urllib errors are OSErrors
            raise DatasetError(_fetch_failure(source, root, err, download)) from err
        opened.append((ds, split))
    return opened


def index_torchvision(
    source: TorchvisionSource, root: Path, warn: Callable[[str], None] | None = None
) -> pd.DataFrame:
    """The official splits as torchvision lists them; unreadable images skipped with a warning."""
    warn = warn or warn_line
    frames = []
    for ds, split in _open_splits(source, root, download=False):
        files = getattr(ds, "_images", None) or getattr(ds, "_image_files", None)
        if files is None:  # pragma: no cover - guards against torchvision renaming internals
            raise DatasetError(f"cannot list the files of torchvision's {source.class_name}")
        labels = list(ds._labels)
        classes = list(ds.classes)
        frames.append(
            pd.DataFrame(
                {
                    "path": [_portable(Path(f)) for f in files],
                    "label": labels,
                    "class_name": [classes[i] for i in labels],
                    "split": split,
                }
            )
        )
    index = pd.concat(frames, ignore_index=True)[INDEX_COLUMNS]
    check_files_exist(index, root / source.folder)
    readable = set(_readable([Path(p) for p in index["path"]], warn, f"{source.title} in {root}"))
    index = index[[Path(p) in readable for p in index["path"]]].reset_index(drop=True)
    empty = sorted(
        set(index["class_name"].unique())
        ^ set(index.loc[index["split"] == "train", "class_name"].unique())
    )
    if empty:
        raise DatasetError(
            f"{source.title} in {root}: no readable training image left for {', '.join(empty)}"
        )
    return index


def _fetch_failure(source: TorchvisionSource, root: Path, err: Exception, download: bool) -> str:
    where = root / source.folder
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    if not download:
        return (
            f"{source.title} is not in {root} ({reason}): run the download stage "
            f"(dvc repro), or {source.manual(root)}"
        )
    archives = sorted(a for a in source.archives if (root / a).exists())
    if archives or "corrupted" in reason.lower() or "md5" in reason.lower():
        return (
            f"{source.title}: {', '.join(archives) or 'a download'} in {root} failed "
            f"torchvision's checksum check ({reason}); a partial or damaged download is never "
            "used: delete it and rerun, or place a good copy in data.root"
        )
    return (
        f"could not fetch {source.title} into {where} ({reason}). Without network, either run the "
        f"offline digits pipeline (make digits) or {source.manual(Path('<data.root>'))} and rerun"
    )


def export_digits(folder: Path) -> Path:
    """scikit-learn's bundled 8x8 digits as PNGs in imagefolder layout (train/ and test/).

    The digits have no official split: a fixed stratified 25 % is the test split, independent of
    the experiment's seed so that every experiment is scored on the same images.
    """
    from PIL import Image
    from sklearn.datasets import load_digits  # scikit-learn: imported for digits only
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    indices = np.arange(len(images))
    train_idx, test_idx = train_test_split(
        indices, test_size=0.25, stratify=digits.target, random_state=0
    )
    for split, chosen in (("train", train_idx), ("test", test_idx)):
        for i in chosen:
            path = folder / split / str(digits.target[i]) / f"{i:04d}.png"
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(path) as tmp:  # a killed export leaves no half-written PNG
                    Image.fromarray(images[i]).save(tmp, format="PNG")
    return folder


def index_imagefolder(
    root: Path, warn: Callable[[str], None] | None = None, test_ratio: float = 0.2
) -> pd.DataFrame:
    """Index root/train/<class>/* and root/test/<class>/* (or root/val/ as the test split)."""
    warn = warn or warn_line
    if not root.is_dir():
        raise DatasetError(
            f"data.root: {str(root)!r} is not a folder (imagefolder expects "
            f"<root>/train/<class>/* and <root>/test/<class>/*){copied_run_hint(root)}"
        )
    test_dir = next((root / n for n in ("test", "val") if (root / n).is_dir()), None)
    if not (root / "train").is_dir() and test_dir is None:
        return _index_class_folders(root, warn, test_ratio)
    if not (root / "train").is_dir() or test_dir is None:
        raise DatasetError(
            f"data.root: {str(root)!r} must hold train/<class>/ and test/<class>/ "
            f"(or val/<class>/) folders, or only class folders{copied_run_hint(root)}"
        )
    return _index_splits(root, [("train", root / "train"), ("test", test_dir)], warn)


def _index_class_folders(root: Path, warn: Callable[[str], None], ratio: float) -> pd.DataFrame:
    """root/<class>/*, no official split: `ratio` of each class's images form the test split,
    chosen by a hash of their path within the class folder. The choice depends on no seed, so
    every experiment is scored on the same images, and adding a photo moves at most one other."""
    classes = [d for d in root.iterdir() if d.is_dir() and not _hidden(d.name)]
    if len(classes) < 2:
        raise DatasetError(
            f"data.root: {str(root)!r} holds neither train/<class>/ and test/<class>/ folders "
            f"nor class folders (at least 2){copied_run_hint(root)}"
        )
    index = _index_splits(root, [("train", root)], warn)
    for name, rows in index.groupby("class_name", sort=False):
        count = round(len(rows) * ratio)
        if count < 1 or len(rows) - count < 2:
            raise DatasetError(
                f"data.test_ratio: {ratio} leaves class {name!r} ({len(rows)} images) without "
                "test images or with fewer than 2 to train and validate on"
            )
        keys = rows["path"].map(lambda path, name=name: _stable_key(path, str(name)))
        index.loc[keys.sort_values(kind="stable").index[:count], "split"] = "test"
    print(
        f"{root}: no train/ and test/ folders: {len(classes)} class folders; "
        f"{(index['split'] == 'test').sum()} images form the test split (data.test_ratio)"
    )
    return index


def _stable_key(path: str, class_name: str) -> str:
    """A hash of an image's path inside its class folder: the same wherever data.root lies."""
    inside = path[path.rindex(f"/{class_name}/") + len(class_name) + 2 :]
    return hashlib.sha256(inside.encode("utf-8", "surrogateescape")).hexdigest()


SYSTEM_FOLDERS = ("@eaDir", "__MACOSX")  # NAS thumbnails, macOS archive metadata


def _hidden(name: str) -> bool:
    return name.startswith(".") or name in SYSTEM_FOLDERS


def _index_splits(
    root: Path, splits: list[tuple[str, Path]], warn: Callable[[str], None]
) -> pd.DataFrame:
    """Index each split folder's class folders (the classes are the first split's)."""
    train_dir = splits[0][1]
    classes = sorted(d.name for d in train_dir.iterdir() if d.is_dir() and not _hidden(d.name))
    if len(classes) < 2:
        raise DatasetError(
            f"{train_dir} has {len(classes)} class folder(s); a classifier needs at least 2"
        )
    rows = []
    for split, split_dir in splits:
        folders = {d.name for d in split_dir.iterdir() if d.is_dir() and not _hidden(d.name)}
        extra = sorted(folders - set(classes))
        if extra:
            raise DatasetError(f"{split_dir} has classes not in train/: {', '.join(extra)}")
        skipped: list[Path] = []
        for label, name in enumerate(classes):
            class_dir = split_dir / name
            found = sorted(class_dir.rglob("*")) if class_dir.is_dir() else []
            # hidden and system folders hold thumbnails and metadata, never samples
            files = [
                f
                for f in found
                if f.is_file() and not any(_hidden(part) for part in f.relative_to(class_dir).parts)
            ]
            images = [f for f in files if f.suffix.lower() in IMAGE_EXTENSIONS]
            image_set = set(images)
            skipped += [f for f in files if f not in image_set]
            images = _readable(images, warn)
            if split == "train" and not images:
                raise DatasetError(
                    f"{class_dir} holds no readable images ({', '.join(IMAGE_EXTENSIONS)})"
                )
            rows += [(_portable(f), label, name, split) for f in images]
        if skipped:
            names = [f.relative_to(split_dir).as_posix() for f in skipped]
            warn(
                f"{split_dir}: skipped {len(skipped)} file(s) that are not images by their "
                f"extension: {first_few(names)}"
            )
    index = pd.DataFrame(rows, columns=INDEX_COLUMNS)
    if len(splits) > 1 and not (index["split"] == "test").any():
        raise DatasetError(f"{splits[1][1]} holds no images")
    return index


def warn_line(message: str) -> None:
    """A warning as one line on stderr, naming what and where, not the line of code raising it."""
    print(f"twophase: warning: {message}", file=sys.stderr)


def _readable(images: list[Path], warn: Callable[[str], None], where: str = "") -> list[Path]:
    """The images that decode; the others are skipped with one warning naming a few."""
    with ThreadPoolExecutor(
        max_workers=min(8, os.cpu_count() or 1)
    ) as pool:  # PIL decodes without the GIL
        reasons = list(pool.map(unreadable_reason, images))
    bad = [(path, reason) for path, reason in zip(images, reasons, strict=True) if reason]
    if bad:
        examples = first_few([f"{path.name}: {reason}" for path, reason in bad], separator="; ")
        where = where or str(images[0].parent)
        warn(f"{where}: skipped {len(bad)} image(s) that cannot be used ({examples})")
    return [path for path, reason in zip(images, reasons, strict=True) if not reason]


def check_files_exist(index: pd.DataFrame, where: Path) -> None:
    """An interrupted download or extraction leaves annotations naming files that are not there."""
    missing = [path for path in index["path"] if not Path(path).is_file()]
    if missing:
        raise DatasetError(
            f"{len(missing)} of {len(index)} images listed for {where} are missing (first: "
            f"{missing[0]}): the download or extraction was interrupted; delete {where} and rerun"
        )


def _portable(path: Path) -> str:
    """Paths inside the project are stored relative to it, so a clone elsewhere still works."""
    absolute = path.resolve()
    try:
        return absolute.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return absolute.as_posix()


def read_index(path: Path) -> pd.DataFrame:
    """data/index.csv or data/split.csv, paths and class names exactly as written.

    `keep_default_na=False`: pandas otherwise reads cells such as `NA`, `None`, `null`, `nan`
    or `N/A` as missing, even in string columns, and a class folder may have such a name.
    """
    return pd.read_csv(
        path,
        dtype={"path": str, "label": np.int64, "class_name": str, "split": str, "subset": str},
        keep_default_na=False,
    )


def class_names(index: pd.DataFrame) -> list[str]:
    pairs = index[["label", "class_name"]].drop_duplicates().sort_values("label")
    names: list[str] = pairs["class_name"].tolist()
    if pairs["label"].tolist() != list(range(len(names))):
        raise DatasetError("labels in the index must be 0..N-1, each with one class name")
    return names


def fetch_weights(arch: str, weights: str) -> str:
    """Make sure pretrained weights are on disk (torch's hub cache); say what is used."""
    import torch  # imported only here: the download stage's data part runs without it

    from twophase.model import build_model, is_timm, load_state_dict_file, weights_enum

    enum = weights_enum(arch, weights)
    if is_timm(arch) and weights.lower() != "none":
        try:  # timm caches what it fetches itself (the Hugging Face hub cache)
            with network_timeout(NETWORK_TIMEOUT_S):
                build_model(arch, weights, 224)
        except (OSError, RuntimeError) as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise DatasetError(
                f"could not fetch the {arch} weights from timm's hub ({reason[:160]}). Without "
                "network, set model.weights to a local weights file, or to none"
            ) from err
        return weights
    if enum is None:
        if weights.lower() != "none":
            load_state_dict_file(Path(weights))
        return weights
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(enum.url)
    if not cached.is_file():
        try:
            with network_timeout(NETWORK_TIMEOUT_S):
                enum.get_state_dict(progress=True, check_hash=True)
        except (OSError, RuntimeError) as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise DatasetError(
                f"could not fetch the {arch} weights {weights} from {enum.url} ({reason}). "
                f"Without network, copy {cached.name} to {cached.parent}/, set model.weights "
                "to a local state-dict file or to none, or run the offline digits pipeline "
                "(make digits)"
            ) from err
    return f"{type(enum).__name__}.{enum.name} ({cached})"
