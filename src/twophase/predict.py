"""Using a trained checkpoint: classify image files, export the whole network for serving.

Both run the full network on raw images with the checkpoint's own preprocessing, in eval mode:
the path a deployed model takes, as opposed to the feature cache the training stages read.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from twophase.batches import BatchOrder
from twophase.checkpoint import network_of, preprocessing_of
from twophase.datasets import IMAGE_EXTENSIONS
from twophase.decode import unreadable_reason
from twophase.errors import TwophaseError
from twophase.images import ImageBatches, ImageDataset
from twophase.io import atomic_path
from twophase.runtime import autocast, autocast_dtype, resolve_device
from twophase.tta import average, views

CHECKPOINT_KEYS = ("arch", "state_dict", "classifier", "head", "class_names", "preprocessing")


class PredictError(TwophaseError):
    """A checkpoint or image path that cannot be used; the message says which and why."""


def read_checkpoint(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """The checkpoint's network in eval mode, or one line saying why it cannot be used."""
    if not path.is_file():
        raise PredictError(f"checkpoint {str(path)!r} does not exist")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError, RuntimeError, EOFError, ...
        raise PredictError(
            f"{str(path)!r} is not a twophase checkpoint: {_unloadable(path, err)}"
        ) from None
    if not isinstance(raw, dict) or any(key not in raw for key in CHECKPOINT_KEYS):
        raise PredictError(
            f"{str(path)!r} is not a twophase checkpoint (it lacks "
            f"{', '.join(k for k in CHECKPOINT_KEYS if not isinstance(raw, dict) or k not in raw)})"
        )
    try:
        size = int(raw["image_size"])
        if size < 8 or len(raw["class_names"]) != raw["head"]["num_classes"]:
            raise ValueError(f"image_size {size}, {len(raw['class_names'])} class names")
        preprocessing_of(raw)
        return network_of(raw).eval(), raw
    except (RuntimeError, KeyError, IndexError, ValueError, TypeError, AttributeError) as err:
        reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise PredictError(
            f"{str(path)!r} is a twophase checkpoint whose metadata does not fit its weights "
            f"({reason}): was it edited by hand? Use the one the stage wrote"
        ) from None


def _unloadable(path: Path, err: Exception) -> str:
    """Why torch.load refused `path`, in words about the file rather than about torch."""
    with path.open("rb") as handle:
        start = handle.read(4)
    if not start:
        return "the file is empty"
    if start[:2] != b"PK" and start[:1] != b"\x80":
        return "it is not a file torch.save writes (no zip archive, no pickle)"
    if "Weights only load failed" in str(err):
        return "it holds Python objects beyond tensors (a pickled model?), which are not unpickled"
    return (
        "it is damaged or cut short ("
        + (str(err).splitlines() or [type(err).__name__])[0][:80]
        + ")"
    )


def collect_images(paths: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Image files named by `paths` (files, folders searched recursively, glob patterns), and
    the files skipped with the reason, in the order given."""
    found: list[Path] = []
    skipped: list[tuple[str, str]] = []
    for given in paths:
        if any(char in given for char in "*?[") and not Path(given).exists():
            matches = sorted(Path(m) for m in glob.glob(given, recursive=True))
            if not matches:
                skipped.append((given, "no file matches this pattern"))
            found += [m for m in matches if m.is_file()]
        elif Path(given).is_dir():
            files = sorted(p for p in Path(given).rglob("*") if p.is_file())
            if not files:
                skipped.append((given, "empty folder"))
            found += files
        elif Path(given).is_file():
            found.append(Path(given))
        else:
            skipped.append((given, "no such file or folder"))
    images = []
    for path in dict.fromkeys(found):
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            skipped.append((str(path), "not an image file (by its extension)"))
        elif (reason := unreadable_reason(path)) is not None:
            skipped.append((str(path), reason))
        else:
            images.append(str(path))
    return images, skipped


def predict_images(
    model: nn.Module,
    checkpoint: dict[str, Any],
    images: Sequence[str],
    *,
    top_k: int = 5,
    batch_size: int = 32,
    device: str = "auto",
    tta: str = "none",
) -> pd.DataFrame:
    """One row per image: path, predicted class, its probability, the top-k with probabilities.

    `tta="flip"`: the probabilities are the mean of the image's and its mirror's (`tta.py`).
    """
    where = resolve_device(device)
    amp = autocast_dtype(where, "auto")
    names: list[str] = checkpoint["class_names"]
    k = max(1, min(top_k, len(names)))
    prep = preprocessing_of(checkpoint)
    dataset = ImageDataset(images, [0] * len(images), checkpoint["image_size"], prep)
    model.to(where).eval()
    rows: list[dict[str, Any]] = []
    batches = ImageBatches(dataset, BatchOrder(len(dataset), batch_size, shuffle=False))
    with (
        torch.inference_mode(),
        tqdm(total=len(dataset), desc="predict", unit="img", disable=None) as bar,
    ):
        for batch, _ in batches:
            answers = []
            for view in views(batch.to(where), tta):
                with autocast(where, amp):
                    logits = model(view)
                answers.append(torch.softmax(logits.float(), dim=1))
            probs = average(answers).cpu()
            values, indices = probs.topk(k, dim=1)
            for value_row, index_row in zip(values.tolist(), indices.tolist(), strict=True):
                row: dict[str, Any] = {
                    "path": images[len(rows)],
                    "predicted": names[index_row[0]],
                    "probability": round(value_row[0], 6),
                }
                for rank, (value, index) in enumerate(zip(value_row, index_row, strict=True), 1):
                    row[f"top{rank}"] = names[index]
                    row[f"top{rank}_probability"] = round(value, 6)
                rows.append(row)
            bar.update(len(batch))
    return pd.DataFrame(rows)


class Probabilities(nn.Module):
    """The network with a softmax on top: what an exported file computes."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(images), dim=1)


def export_metadata(checkpoint: dict[str, Any]) -> dict[str, str]:
    """What a serving process needs besides the weights, as strings (ONNX metadata_props)."""
    prep = preprocessing_of(checkpoint)
    size = int(checkpoint["image_size"])
    return {
        "twophase.arch": checkpoint["arch"],
        "twophase.class_names": json.dumps(checkpoint["class_names"]),
        "twophase.image_size": str(size),
        "twophase.resize": str(round(size * prep.resize_ratio)),
        "twophase.mean": json.dumps(list(prep.mean)),
        "twophase.std": json.dumps(list(prep.std)),
        "twophase.interpolation": prep.interpolation,
        "twophase.input": "float32 NCHW, RGB scaled to [0, 1], resized, centre-cropped, normalised",
        "twophase.output": "class probabilities (softmax), in the order of twophase.class_names",
    }


def export_model(model: nn.Module, checkpoint: dict[str, Any], fmt: str, out: Path) -> Path:
    """The whole network (eval mode, dynamic batch axis) with its metadata, written atomically."""
    network = Probabilities(model.eval().cpu()).eval()
    size = int(checkpoint["image_size"])
    example = torch.randn(2, 3, size, size)
    metadata = export_metadata(checkpoint)
    with atomic_path(out) as tmp:
        if fmt == "onnx":
            _export_onnx(network, example, metadata, tmp)
        elif fmt == "torchscript":
            with torch.inference_mode():
                traced = torch.jit.trace(network, example)  # type: ignore[no-untyped-call]
            torch.jit.save(traced, str(tmp), _extra_files={"twophase.json": json.dumps(metadata)})
        else:
            raise PredictError(f"--format: {fmt!r} is not allowed; expected onnx or torchscript")
    return out


def _export_onnx(
    network: nn.Module, example: torch.Tensor, meta: dict[str, str], out: Path
) -> None:
    import onnx  # only to save ONNX; TorchScript exports and predict never need it

    batch = torch.export.Dim("batch", min=1)
    program = torch.onnx.export(
        network,
        (example,),
        dynamo=True,
        input_names=["images"],
        output_names=["probabilities"],
        dynamic_shapes={"images": {0: batch}},
        opset_version=18,
        verbose=False,  # not torch.onnx's eight progress lines on every export
    )
    if program is None:  # pragma: no cover - dynamo=True always returns the program
        raise PredictError("ONNX export produced nothing")
    proto = program.model_proto
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(out))
