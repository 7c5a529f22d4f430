"""A few steps of the run's own distillation on one candidate student: how the budget search
compares its finalists (:class:`distill.models.shape_search.Finalists`).

The step is the training loop's (:func:`distill.train.step.micro_batch_loss`: the configured
divergence, its CE blend, hidden-state matching if set), on one process and without
accelerate: the search runs on the main process only, before the run's student exists, so
nothing here may wait on the other processes. Every finalist sees the same blocks in the same
order and the same learning-rate schedule (the run's, compressed to ``steps``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from distill.config import PipelineConfig
from distill.models import Finalists
from distill.train.hidden_states import hidden_match
from distill.train.losses import make_kd_loss, scored_positions
from distill.train.step import (
    NonFiniteError,
    StepContext,
    lr_at,
    micro_batch_loss,
    micro_batches_for_step,
)

log = logging.getLogger(__name__)


def score_steps(steps: int) -> list[int]:
    """The steps a finalist is scored after: a quarter, half and all of ``steps`` (distinct,
    at least 1), so the search's record shows whether the order settled early."""
    return sorted({max(1, steps // 4), max(1, steps // 2), steps})


def finalists(cfg: PipelineConfig, teacher: Any) -> Finalists:
    """The budget search's finalists, each trained ``pair.student.budget_finalist_steps``
    steps with ``cfg``'s loss, batch and learning rate against ``teacher``."""
    student_cfg, tc = cfg.pair.student, cfg.train
    steps = student_cfg.budget_finalist_steps
    schedule = replace(
        tc,
        max_steps=steps,
        warmup_steps=min(tc.warmup_steps, steps // 4),
        grad_accum_steps=1,
        on_policy_fraction=0.0,  # sampling needs the run's accelerator; see the docstring
    )
    # What the run has that a finalist's few steps leave out, said rather than dropped silently.
    left_out = [
        f"train.{key}={getattr(tc, key)}"
        for key, plain in (("grad_accum_steps", 1), ("on_policy_fraction", 0.0))
        if getattr(tc, key) != plain
    ]
    if tc.teacher_mode != "online":
        left_out.append(
            f"train.teacher_mode={tc.teacher_mode} (the finalists read the teacher online)"
        )
    if left_out and student_cfg.budget_finalists >= 2:
        log.info(
            "budget search: the finalists train one micro-batch a step, off-policy, with the "
            "online teacher; not applied to them: %s",
            ", ".join(left_out),
        )
    recipe = (
        f"{steps} steps of batch {tc.batch_size}, lr {tc.lr} (warmup "
        f"{schedule.warmup_steps}, min ratio {tc.min_lr_ratio}), weight decay "
        f"{tc.weight_decay}, clip {tc.max_grad_norm}, seed {tc.seed}, loss {cfg.loss}"
    )

    def retrain(
        student: Any,
        blocks: torch.Tensor,
        score: Callable[[Any], float],
        tick: Callable[[], object],
    ) -> dict[int, float]:
        torch.manual_seed(tc.seed)
        device = next(student.parameters()).device
        optimizer = torch.optim.AdamW(
            student.parameters(), lr=tc.lr, betas=(0.9, 0.95), weight_decay=tc.weight_decay
        )
        ctx = StepContext(
            student=student,
            teacher=teacher,
            optimizer=optimizer,
            accelerator=None,  # type: ignore[arg-type]  (micro_batch_loss never reads it)
            kd_ratio=cfg.loss.kd_ratio,
            max_grad_norm=tc.max_grad_norm,
            kd_loss=make_kd_loss(cfg.loss),
            chunk_size=cfg.loss.chunk_size,
            hidden=hidden_match(cfg.loss, student, teacher),
        )
        at, scores = score_steps(steps), {}
        for step in range(steps):
            student.train()
            (batch,) = micro_batches_for_step(blocks, schedule, step, 0, 1, device)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, schedule)
            tokens = scored_positions(batch.labels, batch.attention_mask).sum().float()
            loss, parts = micro_batch_loss(ctx, batch, tokens)
            loss.backward()
            norm = float(torch.nn.utils.clip_grad_norm_(student.parameters(), tc.max_grad_norm))
            if not (math.isfinite(parts["loss"]) and math.isfinite(norm)):
                raise NonFiniteError(
                    f"budget search: a finalist's step {step} gave loss {parts['loss']}, "
                    f"gradient norm {norm}: lower train.lr or set "
                    "pair.student.budget_finalists=0"
                )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            tick()
            if step + 1 in at:
                student.eval()
                scores[step + 1] = score(student)
        return scores

    return Finalists(student_cfg.budget_finalists, steps, retrain, recipe)
