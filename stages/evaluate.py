"""DVC stage `evaluate`: both phases' checkpoints on the test split, side by side."""

from pathlib import Path

import _src_path  # noqa: F401

from twophase.datasets import read_index
from twophase.evaluation import evaluate
from twophase.params import load_params
from twophase.stage import run_stage

EMBEDDINGS = Path("data/embeddings")
ACTIVATIONS = Path("data/activations")
TTA = Path("data/tta")
SPLIT = Path("data/split.csv")
CHECKPOINTS = {"transfer": Path("models/transfer.pt"), "finetune": Path("models/finetune.pt")}
METRICS = Path("metrics/evaluate.json")
PLOTS = Path("plots/evaluate")


def main() -> None:
    params = load_params()
    split = read_index(SPLIT)
    summary = evaluate(params, EMBEDDINGS, ACTIVATIONS, split, CHECKPOINTS, METRICS, PLOTS, TTA)
    for phase in ("transfer", "finetune", "transfer_tta", "finetune_tta"):
        if phase not in summary:  # the *_tta scores, only with evaluate.tta
            continue
        scores = summary[phase]
        print(f"{phase}: accuracy {scores['accuracy']:.4f}, macro F1 {scores['f1_macro']:.4f}")


if __name__ == "__main__":
    run_stage(main, batch_size_param="finetune.batch_size")
