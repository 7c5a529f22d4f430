"""One optimizer step of distillation, testable alone: ``train_step(ctx, micro_batches, lr, step)``.

The loop (:mod:`distill.train.loop`) builds a :class:`StepContext` once and calls
:func:`train_step` for every step with the micro-batches of :func:`micro_batches_for_step`
and the learning rate of :func:`lr_at`; both are pure functions of the step, so resuming
needs only the step, the weights, the optimizer and the RNG.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor

from distill.config import TrainConfig
from distill.data import batch_indices
from distill.errors import DistillError
from distill.train.chunked_loss import chunked_distill_loss
from distill.train.hidden_states import HiddenMatch, capture_outputs, hidden_state_loss
from distill.train.losses import (
    KDLoss,
    ProjectedTeacher,
    TopKTeacher,
    cross_entropy_per_token,
    reduce_masked,
    scored_positions,
    shift_for_next_token,
)
from distill.train.on_policy import SampleSettings, is_on_policy, sample_seed, sampled_rows


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
    ``block_ids`` ``(B,)``, the rows of ``data.train`` (how the cached teacher finds them).

    On-policy micro-batches come in two states: from :func:`micro_batches_for_step` with
    ``sample_seed`` set and ``input_ids`` the prompts ``(B, P)``; :func:`train_step` replaces
    them by the student's samples (:func:`sampled_batch`), which have ``on_policy`` True and
    labels ``IGNORE_INDEX`` wherever there is no sampled target."""

    input_ids: Tensor
    labels: Tensor
    attention_mask: Tensor | None = None
    block_ids: Tensor | None = None
    sample_seed: int | None = None
    on_policy: bool = False


@dataclass
class StepContext:
    """Everything a step reads besides its batches: models, optimizer and loss settings."""

    student: Any  # as prepared by accelerate (may be DDP/FSDP-wrapped)
    teacher: Any
    optimizer: torch.optim.Optimizer
    accelerator: Accelerator
    kd_ratio: float
    max_grad_norm: float
    # The divergence with its settings bound (distill.train.losses.make_kd_loss): always named
    # by the config, never a silent default.
    kd_loss: KDLoss
    # Positions per chunk of the memory-bounded loss (None: the plain form), and the output
    # projections it is fused with (None: that model's logits are made whole first).
    chunk_size: int | None = None
    student_head: Any = None
    teacher_head: Any = None
    # train.teacher_mode=cached: top-k teacher rows come from here instead of a forward.
    teacher_cache: Any = None
    # How the student samples on-policy micro-batches (None: no micro-batch is on-policy).
    sampling: SampleSettings | None = None
    # loss.hidden_weight > 0: the blocks and layer pairs of hidden-state matching.
    hidden: HiddenMatch | None = None


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


def _teacher_side(
    ctx: StepContext, batch: Batch
) -> tuple[Tensor | TopKTeacher | ProjectedTeacher | None, dict[int, Tensor]]:
    """The teacher's targets (None without KD) and, with hidden-state matching, its matched
    blocks' outputs ``(B, T, D)`` from the same forward."""
    if ctx.hidden is None:
        return (teacher_targets(ctx, batch) if ctx.kd_ratio > 0.0 else None), {}
    pairs = ctx.hidden.pairs
    with capture_outputs(ctx.hidden.teacher_layers, [t for _, t in pairs]) as states:
        if ctx.kd_ratio > 0.0:
            return teacher_targets(ctx, batch), states
        with torch.no_grad():  # hidden states only: one logit row is enough
            ctx.teacher(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, logits_to_keep=1
            )
    return None, states


def _logit_loss(
    ctx: StepContext, batch: Batch, teacher: Any, num_tokens: Tensor, kd_ratio: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(loss, ce, kd, valid)``: the blended logit loss ``(1 - kd_ratio) * ce + kd_ratio *
    kd`` over the scored positions ``valid`` ``(B, T-1)``, chunked or plain."""
    kd_loss = ctx.kd_loss
    valid = scored_positions(batch.labels, batch.attention_mask)
    kwargs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    if ctx.chunk_size is not None:
        # Only scored positions enter the loss; the full (B, T, V) logits are never made
        # when the student's head is fused in.
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
            kd_ratio=kd_ratio,
            num_tokens=num_tokens,
            chunk_size=ctx.chunk_size,
        )
        return loss, ce, kd, valid
    logits = ctx.student(**kwargs).logits
    s_logits, targets, _ = shift_for_next_token(logits, batch.labels, batch.attention_mask)
    ce = reduce_masked(cross_entropy_per_token(s_logits, targets), valid, num_tokens)
    if isinstance(teacher, ProjectedTeacher):
        teacher = teacher.logits()
    if teacher is not None:
        kd = reduce_masked(kd_loss(s_logits, teacher), valid, num_tokens)
    else:
        kd = torch.zeros((), device=ce.device)
    return (1.0 - kd_ratio) * ce + kd_ratio * kd, ce, kd, valid


def _capture_student(ctx: StepContext) -> Any:
    """Keeps the student's matched blocks' outputs while active (nothing without matching)."""
    if ctx.hidden is None:
        return nullcontext({})
    return capture_outputs(ctx.hidden.student_layers, [s for s, _ in ctx.hidden.pairs])


def micro_batch_loss(
    ctx: StepContext, batch: Batch, num_tokens: Tensor
) -> tuple[Tensor, dict[str, float]]:
    """Loss ``(1 - kd_ratio) * ce + kd_ratio * kd + hidden_weight * hidden`` of one
    micro-batch, already divided by the window's token count; with the parts ``ce``, ``kd``,
    ``hidden``, ``loss`` as floats.

    On an on-policy micro-batch (``batch.on_policy``) there is no CE term: as in GKD, the
    student's own samples are not targets to imitate, only positions where the teacher's
    distribution is matched. The divergence keeps its ``kd_ratio`` weight, so a KD token
    weighs the same in either kind of micro-batch; ``ce`` counts as 0 there.
    """
    teacher, teacher_states = _teacher_side(ctx, batch)
    if batch.on_policy and teacher is None:
        raise DistillError(
            "an on-policy micro-batch needs the online teacher's divergence: set "
            "loss.kd_ratio > 0 and train.teacher_mode=online"
        )
    with _capture_student(ctx) as student_states:
        # kd_ratio 1 then scaled back: the blend without its CE term (see the docstring).
        ratio = 1.0 if batch.on_policy else ctx.kd_ratio
        loss, ce, kd, valid = _logit_loss(ctx, batch, teacher, num_tokens, ratio)
    del teacher
    if batch.on_policy:
        loss, ce = ctx.kd_ratio * loss, torch.zeros_like(ce)
    if ctx.hidden is not None:
        hidden = hidden_state_loss(ctx.hidden, student_states, teacher_states, valid, num_tokens)
        loss = loss + ctx.hidden.weight * hidden
    else:
        hidden = torch.zeros((), device=loss.device)
    del student_states, teacher_states
    parts = {"ce": ce.item(), "kd": kd.item(), "hidden": hidden.item(), "loss": loss.item()}
    return loss, parts


def sampled_batch(ctx: StepContext, batch: Batch) -> Batch:
    """The on-policy micro-batch that replaces ``batch`` (prompts ``(B, P)``): the student's
    samples under ``batch.sample_seed``, drawn with the unwrapped student (a plain
    ``generate``, outside any DDP/FSDP wrapper's training forward).

    Raises:
        DistillError: the context has no sampling settings.
    """
    if ctx.sampling is None:
        raise DistillError("an on-policy micro-batch needs StepContext.sampling")
    assert batch.sample_seed is not None
    model = ctx.accelerator.unwrap_model(ctx.student)
    ids, labels, mask = sampled_rows(model, batch.input_ids, ctx.sampling, batch.sample_seed)
    return Batch(input_ids=ids, labels=labels, attention_mask=mask, on_policy=True)


def train_step(
    ctx: StepContext, micro_batches: list[Batch], lr: float, step: int
) -> dict[str, float]:
    """One optimizer step over ``micro_batches`` (the accumulation window).

    Every micro-batch loss is divided by the number of scored tokens in the whole window
    across all processes, so 4 × 1 and 1 × 4 micro-batching give the same gradient even with
    padding. DDP averages gradients over processes, hence the ``num_processes`` factor.

    On-policy micro-batches (``sample_seed`` set) are first replaced by the student's
    samples (:func:`sampled_batch`), so the token count covers exactly the sampled positions.

    Returns:
        ``ce``, ``kd``, ``hidden``, ``loss`` (means over the global window), ``grad_norm``,
        ``lr``, ``tokens`` (the scored tokens of the window, all processes), and this
        process's seconds spent sampling (``sample_s``, 0 when no micro-batch is on-policy)
        and in the update (``update_s``: forwards, backwards, clip, optimizer step).

    Raises:
        NonFiniteError: before the optimizer step, when the loss or gradient norm is not finite.
    """
    acc = ctx.accelerator
    t0 = time.perf_counter()
    sampling = any(b.sample_seed is not None for b in micro_batches)
    micro_batches = [
        sampled_batch(ctx, b) if b.sample_seed is not None else b for b in micro_batches
    ]
    t1 = time.perf_counter()
    sample_s = t1 - t0 if sampling else 0.0
    local = sum(int(scored_positions(b.labels, b.attention_mask).sum()) for b in micro_batches)
    num_tokens = acc.reduce(torch.tensor(float(local), device=acc.device), reduction="sum")
    for group in ctx.optimizer.param_groups:
        group["lr"] = lr
    totals = {"ce": 0.0, "kd": 0.0, "hidden": 0.0, "loss": 0.0}
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
            f"step {step}: loss is {totals['loss']} (ce={totals['ce']}, kd={totals['kd']}, "
            f"hidden={totals['hidden']}); "
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
    names = list(totals)
    reduced = acc.reduce(
        torch.tensor([totals[k] for k in names], device=acc.device), reduction="sum"
    ).tolist()  # a device sync, so update_s includes the work queued on an accelerator
    return {
        **dict(zip(names, reduced, strict=True)),
        "grad_norm": grad_norm_value,
        "lr": lr,
        "tokens": float(num_tokens),
        "sample_s": sample_s,
        "update_s": time.perf_counter() - t1,
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
    processes (rank ``r`` takes rows ``r * batch_size ..`` of each global batch).

    A ``train.on_policy_fraction`` share of them (:func:`~distill.train.on_policy.
    is_on_policy`, the same on every process) hold only the prompts, the first
    ``sample_prompt_tokens`` of each block, and a ``sample_seed``; :func:`train_step` has
    the student write the rest."""
    out = []
    for k in range(cfg.grad_accum_steps):
        index = step * cfg.grad_accum_steps + k
        idx = batch_indices(blocks.shape[0], cfg.batch_size * world, index, cfg.seed)
        mine = idx[rank * cfg.batch_size : (rank + 1) * cfg.batch_size]
        ids = blocks[mine].to(device)
        batch = Batch(input_ids=ids, labels=ids, block_ids=torch.tensor(mine))
        if is_on_policy(cfg.seed, index, cfg.on_policy_fraction):
            prompts = ids[:, : cfg.sample_prompt_tokens]
            seed = sample_seed(cfg.seed, step, k, rank)
            batch = Batch(input_ids=prompts, labels=prompts, block_ids=None, sample_seed=seed)
        out.append(batch)
    return out
