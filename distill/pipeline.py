"""All four stages in one run dir, in order."""

from __future__ import annotations

from pathlib import Path

from distill import evaluate, publish, quantize, train
from distill.config import PipelineConfig


def run(cfg: PipelineConfig, run_dir: Path) -> dict:
    """Distill, quantize, evaluate and publish; print the table and where things are."""
    train.run(cfg, run_dir)
    quantize.run(cfg, run_dir)
    report = evaluate.run(cfg, run_dir)
    published = publish.run(cfg, run_dir)
    print()
    print(evaluate.format_table(report))
    print()
    print(f"run dir:        {run_dir.resolve()}")
    print(f"publish folder: {published.resolve()}")
    return report
