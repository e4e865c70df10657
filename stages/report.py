"""DVC stage `report`: the Markdown report with both phases' metrics, and every picture."""

from pathlib import Path

import _src_path  # noqa: F401

from twophase.params import load_params
from twophase.report import build_report
from twophase.stage import run_stage

REPORT = Path("plots/report.md")


def main() -> None:
    build_report(
        load_params(),
        metrics_dir=Path("metrics"),
        plots_dir=Path("plots"),
        evaluate_dir=Path("plots/evaluate"),
        report_path=REPORT,
        figures_dir=Path("plots/figures"),
    )
    print(f"report -> {REPORT}")


if __name__ == "__main__":
    run_stage(main)
