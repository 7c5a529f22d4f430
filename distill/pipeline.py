"""All four stages in one run dir, in order."""

from __future__ import annotations

from pathlib import Path

import torch

from distill.config import PipelineConfig
from distill.evaluate import stage as evaluate
from distill.evaluate.report import format_table
from distill.publish import stage as publish
from distill.quantize import stage as quantize
from distill.train import loop as train


def _is_main_process() -> bool:
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available()).is_main_process


def run(cfg: PipelineConfig, run_dir: Path) -> dict:
    """Distill, quantize, evaluate and publish; print the table and where things are."""
    train.run(cfg, run_dir)
    if not _is_main_process():
        return {}  # under accelerate launch, one process quantizes, evaluates and publishes
    quantize.run(cfg, run_dir)
    report = evaluate.run(cfg, run_dir)
    published = publish.run(cfg, run_dir)
    print()
    print(format_table(report))
    print()
    print(f"run dir:        {run_dir.resolve()}")
    print(f"publish folder: {published.resolve()}")
    return report
