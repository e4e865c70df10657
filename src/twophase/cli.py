"""The `twophase` command: use a trained checkpoint from the shell.

    twophase predict models/finetune.pt photos/ --out preds.csv [--tta flip]
    twophase export models/finetune.pt --format onnx --out model.onnx
    twophase params
    twophase lr-find --phase transfer

The DVC stages stay the way to train; this is what comes after, and the LR finder before.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from twophase.errors import TwophaseError, debugging, fault_line

# params.TTA_MODES (a test checks they agree), spelt here so `--help` imports no yaml
TTA_MODES = ("none", "flip")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="twophase", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    predict = commands.add_parser(
        "predict",
        help="classify image files with a checkpoint; write a CSV",
        description="Classify images (files, folders searched recursively, or glob patterns) "
        "with a checkpoint's own preprocessing; rows: path, predicted, probability, top-k.",
    )
    predict.add_argument("checkpoint", type=Path, help="e.g. models/finetune.pt")
    predict.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders, globs")
    predict.add_argument(
        "--out",
        type=Path,
        default=None,
        help="the CSV file to write (default: the standard output); an existing folder is refused",
    )
    predict.add_argument("--top-k", type=int, default=5, help="classes per row (default: 5)")
    predict.add_argument(
        "--batch-size", type=int, default=32, help="images per forward pass (default: 32)"
    )
    predict.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    predict.add_argument(
        "--tta",
        default="none",
        choices=TTA_MODES,
        help="test-time augmentation: flip averages the probabilities of each image and its "
        "mirror, as evaluate.tta does (default: none)",
    )

    export = commands.add_parser(
        "export",
        help="write the whole network as ONNX or TorchScript",
        description="The whole network (backbone + head, eval mode, softmax output, dynamic "
        "batch axis) with its class names and preprocessing in the file's metadata.",
    )
    export.add_argument("checkpoint", type=Path)
    export.add_argument("--format", choices=("onnx", "torchscript"), default="onnx")
    export.add_argument(
        "--out", type=Path, required=True, help="the file to write; an existing folder is refused"
    )

    params = commands.add_parser("params", help="print params.yaml validated, defaults filled in")
    params.add_argument("file", nargs="?", type=Path, default=Path("params.yaml"))

    lr_find = commands.add_parser(
        "lr-find",
        help="find a learning rate for a phase on the feature cache; plot the curve",
        description="fastai's LR finder on the workspace's feature cache: up to --steps training "
        "steps of the phase as params.yaml sets it up, at a learning rate growing exponentially "
        "from --start-lr to --end-lr, stopped when the loss diverges. Prints the suggested LR "
        "(fastai's valley) and writes the curve to plots/lr_find/PHASE.csv, which `dvc plots "
        "show` draws; no stage's output changes.",
    )
    lr_find.add_argument("--phase", choices=("transfer", "finetune"), required=True)
    lr_find.add_argument("--steps", type=int, default=100, help="at most (default: 100)")
    lr_find.add_argument("--start-lr", type=float, default=1e-7, help="(default: 1e-7)")
    lr_find.add_argument("--end-lr", type=float, default=10.0, help="(default: 10)")

    args = parser.parse_args(argv)
    try:
        if args.command == "predict":
            return _predict(args)
        if args.command == "export":
            return _export(args)
        if args.command == "lr-find":
            return _lr_find(args)
        return _params(args)
    except TwophaseError as err:
        print(f"twophase: error: {err}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `twophase predict … | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (OSError, RuntimeError) as err:
        fault = None if debugging() else fault_line(err)
        if fault is None:
            raise
        print(f"twophase: error: {fault}", file=sys.stderr)
        return 1


def _predict(args: argparse.Namespace) -> int:
    # torch, torchvision, pandas: imported here, so `twophase params` and `--help` never wait
    from twophase.io import write_csv
    from twophase.predict import collect_images, predict_images, read_checkpoint

    if args.top_k < 1 or args.batch_size < 1:
        raise TwophaseError("--top-k and --batch-size must be at least 1")
    if args.out is not None:
        _check_out(args.out)
    model, checkpoint = read_checkpoint(args.checkpoint)
    images, skipped = collect_images(args.paths)
    for path, reason in skipped:
        print(f"twophase: skipped {path}: {reason}", file=sys.stderr)
    if not images:
        raise TwophaseError("no image to classify among the given paths")
    table = predict_images(
        model,
        checkpoint,
        images,
        top_k=args.top_k,
        batch_size=args.batch_size,
        device=args.device,
        tta=args.tta,
    )
    if args.out is None:  # the CSV is the output, as Unix tools write it; the summary to stderr
        table.to_csv(sys.stdout, index=False)
        print(f"{len(table)} image(s) classified; {len(skipped)} skipped", file=sys.stderr)
        return 0
    write_csv(table, args.out)
    print(f"{len(table)} image(s) classified -> {args.out}; {len(skipped)} skipped")
    return 0


def _export(args: argparse.Namespace) -> int:
    from twophase.predict import export_model, read_checkpoint  # torch: as in _predict

    _check_out(args.out)
    model, checkpoint = read_checkpoint(args.checkpoint)
    export_model(model, checkpoint, args.format, args.out)
    print(f"{checkpoint['arch']} ({args.format}) -> {args.out}")
    return 0


def _check_out(out: Path) -> None:
    """Refuse an output path that is an existing folder before any work: the file written
    there would have to replace the folder and everything in it."""
    if out.is_dir():
        raise TwophaseError(
            f"--out: {str(out)!r} is a folder; give a file path, e.g. {str(out / 'NAME')!r}"
        )


def _lr_find(args: argparse.Namespace) -> int:
    # torch and the training modules: imported here, only by this command
    from twophase.lr_find import CURVES, find_lr, write_curve
    from twophase.params import load_params

    params = load_params()
    curve = find_lr(params, args.phase, args.steps, args.start_lr, args.end_lr)
    path = CURVES / f"{args.phase}.csv"
    write_curve(curve, path)
    section = "train_transfer" if args.phase == "transfer" else "finetune"
    ending = f"diverged at lr {curve.lrs[-1]:.2e}" if curve.diverged else "did not diverge"
    print(f"suggested lr: {curve.suggestion:.2e}")
    print(
        f"{len(curve.lrs)} steps, the loss {ending}; the curve: {path} (dvc plots show); "
        f"try it: dvc exp run -S {section}.lr={curve.suggestion:.2e}"
    )
    return 0


def _params(args: argparse.Namespace) -> int:
    from twophase.params import load_params, to_dict  # yaml: only this subcommand reads it

    print(json.dumps(to_dict(load_params(args.file)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
