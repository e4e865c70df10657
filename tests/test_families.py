"""Every backbone family through the whole chain, in-process, on a tiny image folder, as the
stages call it: the feature cache, both phases, evaluation, predict on raw images (the streamed
network equals the cached path) and a checkpoint that loads into plain torchvision (or timm)
with the docs' own snippet; the ONNX export for one model of each torchvision family and timm.

resnet18 runs through real `dvc` in the end-to-end tests, and so does one other family
(`timm/convnext_atto`, tests/test_e2e_experiments.py), which proves the dvc.yaml path for a
non-ResNet.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tests.helpers import docs_block, make_imagefolder
from tests.test_phases import tiny_params
from twophase import cache, features
from twophase.batches import array_batches
from twophase.checkpoint import load_checkpoint
from twophase.datasets import build_index
from twophase.evaluation import evaluate
from twophase.network import cached_input_model, predict
from twophase.phases import finetune, train_transfer
from twophase.predict import export_model, predict_images, read_checkpoint
from twophase.split import split_index

# one model of each family, at a size that fits its patch grid / downsampling
ONE_PER_FAMILY = {
    "resnet18": 32,
    "regnet_y_400mf": 32,
    "convnext_tiny": 32,
    "efficientnet_b0": 32,
    "mobilenet_v3_small": 32,
    "vit_b_16": 32,
    "swin_t": 32,
}
TIMM = {  # the optional extra; installed with the dev dependencies
    "timm/resnet18": 32,
    "timm/convnext_atto": 32,
    "timm/efficientnet_b0": 32,
    "timm/vit_tiny_patch16_224": 224,
    "timm/swin_tiny_patch4_window7_224": 224,
}
# resnet18's export: tests/test_predict.py
EXPORTED = {*ONE_PER_FAMILY, "timm/convnext_atto"} - {"resnet18"}


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    root = tmp_path_factory.mktemp("families")
    make_imagefolder(root / "images", classes=("a", "b", "c"), train=6, test=2)
    return split_index(build_index("imagefolder", root / "images"), 0.25, 42)


@pytest.mark.parametrize(("arch", "size"), [*ONE_PER_FAMILY.items(), *TIMM.items()])
def test_every_family_runs_the_whole_chain(
    arch: str, size: int, split: pd.DataFrame, tmp_path: Path
) -> None:
    """`finetune.unfreeze: 1` (the default) fits every family."""
    params = tiny_params(
        data={"image_size": size},
        model={"arch": arch},
        train_transfer={"epochs": 1},
        finetune={"epochs": 1},
    )
    embeddings, activations = tmp_path / "embeddings", tmp_path / "activations"
    features.extract_features(params, split, embeddings, activations)
    transfer, tuned = tmp_path / "transfer.pt", tmp_path / "finetune.pt"
    train_transfer(params, embeddings, transfer, tmp_path / "t.csv")
    result = finetune(params, activations, transfer, tuned, tmp_path / "f.csv")
    assert len(result.history) == 2, "the starting weights, then one epoch"
    summary = evaluate(
        params,
        embeddings,
        activations,
        split,
        {"transfer": transfer, "finetune": tuned},
        tmp_path / "evaluate.json",
        tmp_path / "plots",
    )
    assert summary["test_images"] == 6
    assert 0.0 <= summary["finetune"]["accuracy"] <= 1.0
    trained = json.loads((tmp_path / "plots" / "trained_blocks.json").read_text())
    assert trained["transfer"] == [] and len(trained["finetune"]) == 1, trained

    # the whole network on raw images computes what evaluate computed on the cache: every
    # class's probability (predict's top-k holds all three)
    model, checkpoint = read_checkpoint(tuned)
    evaluated = pd.read_csv(tmp_path / "plots" / "predictions_finetune.csv")
    predicted = predict_images(model, checkpoint, list(evaluated["path"]), batch_size=4)
    assert list(predicted["predicted"]) == list(evaluated["predicted"].astype(str))
    np.testing.assert_allclose(predicted["probability"], evaluated["probability"], atol=1e-4)
    names = checkpoint["class_names"]
    streamed = np.zeros((len(predicted), len(names)))
    for rank in (1, 2, 3):
        for row, (name, value) in enumerate(
            zip(predicted[f"top{rank}"], predicted[f"top{rank}_probability"], strict=True)
        ):
            streamed[row, names.index(name)] = value
    test_inputs, test_labels = cache.load_activations(activations, "test")
    nhwc = cache.load_meta(activations)["layout"] == "nchw"
    cached, _ = predict(
        cached_input_model(*load_checkpoint(tuned)),
        array_batches(test_inputs, test_labels, 4, nhwc=nhwc),
        torch.device("cpu"),
    )
    np.testing.assert_allclose(streamed, cached.numpy(), atol=1e-4)

    # the checkpoint loads, strictly, into the library's own model without twophase
    namespace: dict = {}
    loader = docs_block("use-the-model.md", "## Load a checkpoint without twophase")
    exec(loader.replace("models/finetune.pt", str(tuned)), namespace)
    plain = namespace["model"].eval()
    library = "timm." if arch.startswith("timm/") else "torchvision."
    assert type(plain).__module__.startswith(library), type(plain)
    images = torch.randn(3, 3, size, size)
    with torch.inference_mode():
        expected = torch.softmax(model(images), dim=1).numpy()
        assert np.allclose(torch.softmax(plain(images), dim=1).numpy(), expected, atol=1e-4)
    if arch not in EXPORTED:
        return
    import onnxruntime

    export_model(model, checkpoint, "onnx", tmp_path / "model.onnx")
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"))
    (got,) = session.run(None, {"images": images.numpy()})
    assert np.allclose(got, expected, atol=1e-4)
