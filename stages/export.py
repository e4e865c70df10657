"""DVC stage `export`: phase 2's network as ONNX, for serving without PyTorch."""

from pathlib import Path

import _src_path  # noqa: F401

from twophase.predict import export_model, read_checkpoint
from twophase.stage import run_stage

CHECKPOINT = Path("models/finetune.pt")
ONNX = Path("models/model.onnx")


def main() -> None:
    model, checkpoint = read_checkpoint(CHECKPOINT)
    export_model(model, checkpoint, "onnx", ONNX)
    print(f"{checkpoint['arch']} with its head, softmax output -> {ONNX}")


if __name__ == "__main__":
    run_stage(main)
