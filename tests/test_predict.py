"""Predict and export from a trained checkpoint, on raw images, end to end."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

from tests.helpers import write_image
from tests.test_phases import cached_imagefolder
from twophase.cli import main
from twophase.evaluation import evaluate
from twophase.phases import finetune, train_transfer
from twophase.predict import export_model, predict_images, read_checkpoint


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny imagefolder run through every stage function, as `dvc repro` does."""
    root = tmp_path_factory.mktemp("predict")
    params, split = cached_imagefolder(root, test=4)
    train_transfer(params, root / "embeddings", root / "transfer.pt", root / "t.csv")
    finetune(
        params, root / "activations", root / "transfer.pt", root / "finetune.pt", root / "f.csv"
    )
    evaluate(
        params,
        root / "embeddings",
        root / "activations",
        split,
        {"transfer": root / "transfer.pt", "finetune": root / "finetune.pt"},
        root / "evaluate.json",
        root / "plots",
    )
    return root


def test_predict_on_raw_images_equals_evaluate_on_the_cache(trained: Path) -> None:
    evaluated = pd.read_csv(trained / "plots/predictions_finetune.csv")
    model, checkpoint = read_checkpoint(trained / "finetune.pt")
    predicted = predict_images(model, checkpoint, evaluated["path"].tolist(), top_k=2)
    assert predicted["path"].tolist() == evaluated["path"].tolist()
    assert predicted["predicted"].tolist() == evaluated["predicted"].tolist()
    assert list(predicted.columns) == [
        "path",
        "predicted",
        "probability",
        "top1",
        "top1_probability",
        "top2",
        "top2_probability",
    ]
    assert (predicted["probability"] == predicted["top1_probability"]).all()


def test_cli_predict_writes_the_csv_and_lists_what_it_skipped(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "new photos"  # a space in the path
    write_image(folder / "one.jpg", seed=1, size=(40, 30))
    write_image(folder / "grey.png", seed=2, fmt="PNG", mode="L")
    write_image(folder / "alpha.png", seed=3, fmt="PNG", mode="RGBA")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image")
    (tmp_path / "nothing here").mkdir()
    out = tmp_path / "preds.csv"
    code = main(
        [
            "predict",
            str(trained / "finetune.pt"),
            str(folder),
            str(tmp_path / "nothing here"),
            str(tmp_path / "missing.jpg"),
            "--out",
            str(out),
            "--top-k",
            "3",
        ]
    )
    assert code == 0
    table = pd.read_csv(out)
    assert sorted(Path(p).name for p in table["path"]) == ["alpha.png", "grey.png", "one.jpg"]
    assert set(table["predicted"]) <= {"a", "b", "c"}
    assert np.allclose(
        table[["top1_probability", "top2_probability", "top3_probability"]].sum(axis=1),
        1,
        atol=1e-4,
    )
    err = capsys.readouterr().err
    for name, reason in (
        ("empty.jpg", "unreadable"),
        ("notes.txt", "not an image"),
        ("nothing here", "empty folder"),
        ("missing.jpg", "no such file"),
    ):
        assert re.search(rf"skipped .*{re.escape(name)}: {reason}", err), (name, err)


def test_cli_predict_takes_glob_patterns(trained: Path, tmp_path: Path) -> None:
    out = tmp_path / "p.csv"
    assert (
        main(
            [
                "predict",
                str(trained / "finetune.pt"),
                str(trained / "images/test/*/*.jpg"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert len(pd.read_csv(out)) == 12


def test_a_huge_image_is_skipped_not_decoded(trained: Path, tmp_path: Path, capsys) -> None:
    huge = tmp_path / "huge.png"
    Image.new("L", (20000, 20000)).save(huge)  # 400 megapixels: over twice PIL's bomb limit
    assert (
        main(
            [
                "predict",
                str(trained / "finetune.pt"),
                str(huge),
                str(trained / "images/test/a"),
                "--out",
                str(tmp_path / "p.csv"),
            ]
        )
        == 0
    )
    assert "huge.png: too large" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d, _: d / "absent.pt", "does not exist"),
        (
            lambda d, _: _saved(d / "plain.pt", {"weight": torch.zeros(2)}),
            "is not a twophase checkpoint",
        ),
        (
            lambda d, _: _written(d / "zero.pt", b""),
            "is not a twophase checkpoint: the file is empty",
        ),
        (
            lambda d, _: _written(d / "notes.pt", b"some text, not a checkpoint"),
            "it is not a file torch.save writes",
        ),
        (lambda d, _: _saved(d / "pickled.pt", nn.Linear(2, 2)), "holds Python objects beyond"),
        (
            lambda d, trained: _edited(trained, d, image_size=0),
            "whose metadata does not fit its weights",
        ),
        (
            lambda d, trained: _edited(trained, d, class_names=["a"]),
            "whose metadata does not fit its weights",
        ),
        (
            lambda d, trained: _edited(trained, d, arch="resnet50"),
            "whose metadata does not fit its weights",
        ),
        (
            lambda d, trained: _edited(trained, d, preprocessing={"median": [0.5]}),
            "whose metadata does not fit its weights",
        ),
    ],
    ids=[
        "missing",
        "another project's",
        "empty file",
        "text file",
        "pickled model",
        "image_size 0",
        "fewer class names",
        "another arch",
        "unknown preprocessing key",
    ],
)
def test_unusable_checkpoints_are_one_line(
    trained: Path, tmp_path: Path, make, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = make(tmp_path, trained / "finetune.pt")
    assert main(["predict", str(path), str(tmp_path), "--out", str(tmp_path / "p.csv")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


@pytest.mark.parametrize("command", ["predict", "export"])
@pytest.mark.parametrize("where", ["folder", "cwd"])
def test_out_naming_an_existing_folder_is_refused_and_the_folder_kept(
    trained: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    command: str,
    where: str,
) -> None:
    photos = tmp_path / "photos"
    kept = [write_image(photos / "a.jpg", seed=1), write_image(photos / "sub" / "b.jpg", seed=2)]
    monkeypatch.chdir(photos)
    out = str(photos) if where == "folder" else "."
    args = [command, str(trained / "finetune.pt")]
    args += [str(photos), "--out", out] if command == "predict" else ["--out", out]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--out" in err[0] and "is a folder" in err[0], err
    assert all(path.is_file() for path in kept)
    assert sorted(p.name for p in photos.rglob("*")) == ["a.jpg", "b.jpg", "sub"]


def test_an_output_file_never_replaces_a_folder(tmp_path: Path) -> None:
    from twophase.io import OutputIsFolderError, atomic_path

    folder = tmp_path / "mine"
    write_image(folder / "keep.jpg", seed=0)
    with pytest.raises(OutputIsFolderError), atomic_path(folder) as tmp:
        tmp.write_text("x")
    assert (folder / "keep.jpg").is_file() and not list(tmp_path.glob(".mine.*"))


def _saved(path: Path, obj: object) -> Path:
    torch.save(obj, path)
    return path


def _edited(trained: Path, folder: Path, **changes: object) -> Path:
    """The trained checkpoint with its metadata changed, as a hand edit would."""
    checkpoint = torch.load(trained, weights_only=True)
    return _saved(folder / "edited.pt", {**checkpoint, **changes})


def _written(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def test_onnx_export_matches_torch_and_carries_its_metadata(trained: Path, tmp_path: Path) -> None:
    import onnx
    import onnxruntime

    model, checkpoint = read_checkpoint(trained / "finetune.pt")
    export_model(model, checkpoint, "onnx", tmp_path / "model.onnx")
    proto = onnx.load(str(tmp_path / "model.onnx"))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["twophase.class_names"]) == ["a", "b", "c"]
    assert meta["twophase.image_size"] == "32" and "twophase.mean" in meta
    assert proto.opset_import[0].version >= 17
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"))
    for batch in (1, 3, 8):
        images = torch.randn(batch, 3, 32, 32)
        with torch.inference_mode():
            expected = torch.softmax(model(images), dim=1).numpy()
        (got,) = session.run(None, {"images": images.numpy()})
        assert np.allclose(got, expected, atol=1e-4), batch


def test_torchscript_export_runs_in_a_process_without_twophase(
    trained: Path, tmp_path: Path
) -> None:
    model, checkpoint = read_checkpoint(trained / "finetune.pt")
    export_model(model, checkpoint, "torchscript", tmp_path / "model.pt")
    images = torch.randn(4, 3, 32, 32)
    torch.save(images, tmp_path / "images.pt")
    with torch.inference_mode():
        expected = torch.softmax(model(images), dim=1)
    script = (
        "import json, sys, torch\n"
        f"files = {{'twophase.json': ''}}\n"
        f"m = torch.jit.load({str(tmp_path / 'model.pt')!r}, _extra_files=files)\n"
        f"x = torch.load({str(tmp_path / 'images.pt')!r})\n"
        f"torch.save(m(x), {str(tmp_path / 'out.pt')!r})\n"
        "assert not any(n.startswith('twophase') for n in sys.modules)\n"
        "print(json.loads(files['twophase.json'])['twophase.class_names'])\n"
    )
    done = subprocess.run([sys.executable, "-I", "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert '["a", "b", "c"]' in done.stdout
    assert torch.allclose(torch.load(tmp_path / "out.pt"), expected, atol=1e-5)


def test_grid_shows_the_most_confident_errors_then_a_few_correct() -> None:
    from twophase.plots import grid_choice

    correct = np.array([True, False, True, False, False, True, True, True, True, True])
    confidence = np.array([0.9, 0.6, 0.99, 0.95, 0.5, 0.7, 0.8, 0.85, 0.3, 0.4])
    assert grid_choice(correct, confidence, 4).tolist() == [3, 1, 2, 0]  # 2 of 3 errors, 2 right
    assert grid_choice(correct, confidence, 8).tolist() == [3, 1, 4, 2, 0, 7, 6, 5]
    assert grid_choice(np.ones(3, bool), np.array([0.2, 0.9, 0.5]), 8).tolist() == [1, 2, 0]


def test_report_tables_per_class_worst_first_and_predictions_name_files(trained: Path) -> None:
    from twophase.report import _per_class

    predictions = pd.read_csv(trained / "plots/predictions_transfer.csv")
    assert list(predictions.columns) == ["path", "actual", "predicted", "probability"]
    assert all(Path(p).is_file() for p in predictions["path"])
    lines = _per_class(trained / "plots/per_class.csv").splitlines()
    assert lines[0].startswith("| class | precision 1 | precision 2 |")
    f1_phase2 = [float(line.split("|")[7]) for line in lines[2:]]
    assert f1_phase2 == sorted(f1_phase2) and len(f1_phase2) == 3


def _evaluated(folder: Path, names: list[str], truth: list[int], predicted: list[int]) -> None:
    """What the evaluate and training stages write for the report, both phases alike."""
    from twophase.io import write_csv, write_json
    from twophase.metrics import score, side_by_side
    from twophase.report import PHASE_STAGES

    paths = [str(write_image(folder / "images" / f"{i}.jpg", i)) for i in range(len(truth))]
    scores = score(np.array(truth), np.array(predicted), names)
    rows = [{"phase": phase, **row} for phase in PHASE_STAGES for row in scores["per_class"]]
    write_csv(pd.DataFrame(rows), folder / "plots/per_class.csv")
    write_json(side_by_side(scores, scores, len(truth)), folder / "metrics/evaluate.json")
    for phase, stage in PHASE_STAGES.items():
        predictions = {
            "path": paths,
            "actual": [names[i] for i in truth],
            "predicted": [names[i] for i in predicted],
            "probability": 0.5,
        }
        write_csv(pd.DataFrame(predictions), folder / f"plots/predictions_{phase}.csv")
        history = {"epoch": [0], "train_loss": [1.0], "val_loss": [1.0]}
        write_csv(
            pd.DataFrame({**history, "train_acc": [0.5], "val_acc": [0.5]}),
            folder / f"plots/{stage}/history.csv",
        )
        write_json({"best_epoch": 0}, folder / f"metrics/{stage}.json")


def test_report_per_class_table_keeps_classes_equal_as_numbers_apart(tmp_path: Path) -> None:
    from twophase.report import _per_class

    names = ["01", "1", "1.0"]
    _evaluated(tmp_path, names, [0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 2, 2])
    lines = _per_class(tmp_path / "plots/per_class.csv").splitlines()
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["`01`", "`1`", "`1.0`"]
    assert [line.split("|")[-2].strip() for line in lines[2:]] == ["2", "2", "2"]


def test_report_keeps_class_names_pandas_reads_as_missing(tmp_path: Path) -> None:
    from twophase.params import Params
    from twophase.report import build_report

    names = ["01", "1", "NA", "null"]
    _evaluated(tmp_path, names, [0, 1, 2, 3, 0, 1, 2, 3], [0, 1, 2, 3, 1, 0, 3, 3])
    text = build_report(
        Params(),
        metrics_dir=tmp_path / "metrics",
        plots_dir=tmp_path / "plots",
        evaluate_dir=tmp_path / "plots",
        report_path=tmp_path / "report.md",
        figures_dir=tmp_path / "figures",
    )
    for name in names:
        assert text.count(f"| `{name}` |") == 1, name
    assert "| NA | null | 1 |" in text and "| 01 | 1 | 1 |" in text
    assert "nan" not in text.lower()


def test_cli_predict_without_out_writes_the_csv_to_stdout(
    trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    write_image(tmp_path / "photos" / "one.jpg", seed=1, size=(40, 30))
    monkeypatch.chdir(tmp_path)
    assert main(["predict", str(trained / "finetune.pt"), "photos", "--top-k", "1"]) == 0
    captured = capsys.readouterr()
    rows = captured.out.strip().splitlines()
    assert rows[0] == "path,predicted,probability,top1,top1_probability" and len(rows) == 2
    assert "1 image(s) classified" in captured.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]  # no file written
