"""One optimizer step of distillation, testable alone: ``train_step(ctx, micro_batches, lr, step)``.

The loop (:mod:`distill.train.loop`) builds a :class:`StepContext` once and calls
:func:`train_step` for every step with the micro-batches of :func:`micro_batches_for_step`
and the learning rate of :func:`lr_at`; both are pure functions of the step, so resuming
needs only the step, the weights, the optimizer and the RNG.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor

from distill.config import DistillError, TrainConfig
from distill.data import batch_indices
from distill.train.chunked_loss import chunked_distill_loss
from distill.train.losses import (
    KDLoss,
    ProjectedTeacher,
    TopKTeacher,
    cross_entropy_per_token,
    reduce_masked,
    scored_positions,
    shift_for_next_token,
)


class NonFiniteError(DistillError):
    """Loss or gradient norm became NaN/Inf; the optimizer was not stepped."""


class OutOfMemory(DistillError):
    """A step ran out of memory."""


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``lr`` then cosine decay to ``lr * min_lr_ratio`` at ``max_steps``."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1.0 + math.cos(math.pi * progress))


@dataclass
class Batch:
    """One micro-batch: ``input_ids``/``labels`` ``(B, T)``, ``attention_mask`` or None, and
    ``block_ids`` ``(B,)``, the rows of ``data.train`` (how the cached teacher finds them)."""

    input_ids: Tensor
    labels: Tensor
    attention_mask: Tensor | None = None
    block_ids: Tensor | None = None


@dataclass
class StepContext:
    """Everything a step reads besides its batches: models, optimizer and loss settings."""

    student: Any  # as prepared by accelerate (may be DDP/FSDP-wrapped)
    teacher: Any
    optimizer: torch.optim.Optimizer
    accelerator: Accelerator
    kd_ratio: float
    temperature: float
    scale_by_t2: bool
    max_grad_norm: float
    # The divergence with its settings bound (distill.train.losses.make_kd_loss); None: forward KL.
    kd_loss: KDLoss | None = None
    # Positions per chunk of the memory-bounded loss (None: the plain form), and the output
    # projections it is fused with (None: that model's logits are made whole first).
    chunk_size: int | None = None
    student_head: Any = None
    teacher_head: Any = None
    # train.teacher_mode=cached: top-k teacher rows come from here instead of a forward.
    teacher_cache: Any = None


def teacher_targets(ctx: StepContext, batch: Batch) -> Tensor | TopKTeacher | ProjectedTeacher:
    """The teacher's side of positions ``0 .. T-2``: cached top-k rows ``(B, T-1, k)``, or an
    online forward: final hidden states ``(B, T-1, D)`` when the chunked loss makes the
    logits itself, else logits ``(B, T-1, V)``."""
    if ctx.teacher_cache is not None:
        assert batch.block_ids is not None, "the cached teacher needs Batch.block_ids"
        return ctx.teacher_cache.lookup(batch.block_ids, batch.input_ids.device)
    # no_grad rather than inference_mode: the KD loss saves teacher probabilities for
    # the student's backward, and autograd refuses to save inference-mode tensors.
    with torch.no_grad():
        if ctx.teacher_head is not None and ctx.chunk_size is not None:
            out = ctx.teacher(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                output_hidden_states=True,
                logits_to_keep=1,
            )
            weight, bias = ctx.teacher_head
            return ProjectedTeacher(out.hidden_states[-1][:, :-1], weight, bias)
        return ctx.teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[
            :, :-1
        ]


def micro_batch_loss(
    ctx: StepContext, batch: Batch, num_tokens: Tensor
) -> tuple[Tensor, dict[str, float]]:
    """Blended loss ``(1 - kd_ratio) * ce + kd_ratio * kd`` of one micro-batch, already divided
    by the window's token count; with the parts ``ce``, ``kd``, ``loss`` as floats."""
    kd_loss = ctx.kd_loss or KDLoss("forward_kl", ctx.temperature, ctx.scale_by_t2)
    teacher = teacher_targets(ctx, batch) if ctx.kd_ratio > 0.0 else None
    if ctx.chunk_size is not None:
        # Only scored positions enter the loss; the full (B, T, V) logits are never made
        # when the student's head is fused in.
        valid = scored_positions(batch.labels, batch.attention_mask)
        kwargs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
        if ctx.student_head is not None:
            out = ctx.student(**kwargs, output_hidden_states=True, logits_to_keep=1)
            inputs = out.hidden_states[-1][:, :-1][valid]
        else:
            inputs = ctx.student(**kwargs).logits[:, :-1][valid]
        loss, ce, kd = chunked_distill_loss(
            inputs,
            batch.labels[:, 1:][valid],
            None if teacher is None else teacher[valid],
            head=ctx.student_head,
            kd_loss=kd_loss,
            kd_ratio=ctx.kd_ratio,
            num_tokens=num_tokens,
            chunk_size=ctx.chunk_size,
        )
    else:
        logits = ctx.student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        s_logits, targets, valid = shift_for_next_token(logits, batch.labels, batch.attention_mask)
        ce = reduce_masked(cross_entropy_per_token(s_logits, targets), valid, num_tokens)
        if isinstance(teacher, ProjectedTeacher):
            teacher = teacher.logits()
        if teacher is not None:
            kd = reduce_masked(kd_loss(s_logits, teacher), valid, num_tokens)
        else:
            kd = torch.zeros((), device=ce.device)
        loss = (1.0 - ctx.kd_ratio) * ce + ctx.kd_ratio * kd
    del teacher
    return loss, {"ce": ce.item(), "kd": kd.item(), "loss": loss.item()}


def train_step(
    ctx: StepContext, micro_batches: list[Batch], lr: float, step: int
) -> dict[str, float]:
    """One optimizer step over ``micro_batches`` (the accumulation window).

    Every micro-batch loss is divided by the number of scored tokens in the whole window
    across all processes, so 4 × 1 and 1 × 4 micro-batching give the same gradient even with
    padding. DDP averages gradients over processes, hence the ``num_processes`` factor.

    Returns:
        ``ce``, ``kd``, ``loss`` (means over the global window), ``grad_norm``, ``lr`` and
        ``tokens`` (the scored tokens of the window, all processes).

    Raises:
        NonFiniteError: before the optimizer step, when the loss or gradient norm is not finite.
    """
    acc = ctx.accelerator
    local = sum(int(scored_positions(b.labels, b.attention_mask).sum()) for b in micro_batches)
    num_tokens = acc.reduce(torch.tensor(float(local), device=acc.device), reduction="sum")
    for group in ctx.optimizer.param_groups:
        group["lr"] = lr
    totals = {"ce": 0.0, "kd": 0.0, "loss": 0.0}
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        # Gradients are all-reduced once, on the window's last backward.
        with nullcontext() if last else acc.no_sync(ctx.student):
            loss, parts = micro_batch_loss(ctx, batch, num_tokens)
            acc.backward(loss * acc.num_processes)
        for k in totals:
            totals[k] += parts[k]
    if not math.isfinite(totals["loss"]):
        ctx.optimizer.zero_grad(set_to_none=True)
        raise NonFiniteError(
            f"step {step}: loss is {totals['loss']} (ce={totals['ce']}, kd={totals['kd']}); "
            "the optimizer was not stepped and the last checkpoint is the resume point"
        )
    grad_norm = acc.clip_grad_norm_(ctx.student.parameters(), ctx.max_grad_norm)
    grad_norm_value = float(grad_norm)
    if not math.isfinite(grad_norm_value):
        ctx.optimizer.zero_grad(set_to_none=True)
        raise NonFiniteError(
            f"step {step}: gradient norm is {grad_norm_value}; the optimizer was not stepped "
            "and the last checkpoint is the resume point"
        )
    ctx.optimizer.step()
    ctx.optimizer.zero_grad(set_to_none=True)
    # Losses are summed over processes' shares; the mean over the global window is the sum.
    reduced = acc.reduce(
        torch.tensor([totals["ce"], totals["kd"], totals["loss"]], device=acc.device),
        reduction="sum",
    )
    return {
        "ce": float(reduced[0]),
        "kd": float(reduced[1]),
        "loss": float(reduced[2]),
        "grad_norm": grad_norm_value,
        "lr": lr,
        "tokens": float(num_tokens),
    }


@contextmanager
def explain_out_of_memory(step: int, cfg: TrainConfig) -> Iterator[None]:
    """Turn running out of memory inside ``step`` into :class:`OutOfMemory` naming the knobs.

    Raises:
        OutOfMemory: in place of ``torch.OutOfMemoryError``; other errors pass unchanged.
    """
    try:
        yield
    except torch.OutOfMemoryError:
        raise OutOfMemory(
            f"out of memory at step {step}: lower train.batch_size (now {cfg.batch_size}) "
            "and raise train.grad_accum_steps to keep the batch, lower loss.chunk_size, "
            "or use train.teacher_mode=cached so the teacher is not held; resume from "
            "the last checkpoint with train.resume=auto"
        ) from None


def micro_batches_for_step(
    blocks: Tensor, cfg: TrainConfig, step: int, rank: int, world: int, device: torch.device
) -> list[Batch]:
    """This process's share of global step ``step``: ``grad_accum_steps`` micro-batches of
    ``batch_size`` rows of ``blocks`` ``(N, T)``, from one order shared by all ``world``
    processes (rank ``r`` takes rows ``r * batch_size ..`` of each global batch)."""
    out = []
    for k in range(cfg.grad_accum_steps):
        idx = batch_indices(
            blocks.shape[0], cfg.batch_size * world, step * cfg.grad_accum_steps + k, cfg.seed
        )
        mine = idx[rank * cfg.batch_size : (rank + 1) * cfg.batch_size]
        ids = blocks[mine].to(device)
        out.append(Batch(input_ids=ids, labels=ids, block_ids=torch.tensor(mine)))
    return out
