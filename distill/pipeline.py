"""All four stages in one run dir, in order, sharing what each would otherwise load again.

The teacher is one handle for the whole run (:class:`distill.models.Teacher`: loaded once,
hashed once) and the data is prepared once, after the pre-flight checks; every stage gets
both. Each stage skips what a rerun finds finished (training's ``final/``, quantize's and
evaluate's stamps, the published folder's), so a pipeline killed in any stage resumes there.
"""

from __future__ import annotations

from pathlib import Path

import torch

from distill import evaluate, publish, quantize, train
from distill.caches import cache_root
from distill.config import PipelineConfig
from distill.data import prepare_data
from distill.models import Teacher
from distill.preflight import preflight


def _is_main_process() -> bool:
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available()).is_main_process


def run(cfg: PipelineConfig, run_dir: Path) -> dict:
    """Distill, quantize, evaluate and publish; print the table and where things are."""
    teacher = Teacher(cfg.pair.teacher, cache_root(cfg))
    preflight(cfg, teacher)  # before any weights load or data is prepared
    splits = prepare_data(cfg.data, teacher.tokenizer, cache_root(cfg))
    train.run(cfg, run_dir, teacher=teacher, splits=splits)
    if not _is_main_process():
        return {}  # under accelerate launch, one process quantizes, evaluates and publishes
    quantize.run(cfg, run_dir, teacher=teacher, splits=splits)
    report = evaluate.run(cfg, run_dir, teacher=teacher, splits=splits)
    published = publish.run(cfg, run_dir)
    print()
    print(evaluate.format_table(report))
    print()
    print(f"run dir:        {run_dir.resolve()}")
    print(f"publish folder: {published.resolve()}")
    return report
