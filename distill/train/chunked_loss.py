"""The memory-bounded form of the blended loss: chunks of positions, fused with the head.

The plain loss makes the student's logits ``(B, T, V)`` whole, then softmaxes them in float32:
at V = 49,152 that is the largest tensor of a small student's step. Here at most
``chunk_size`` rows of logits or probabilities exist at once, and with the output
projection fused in (:func:`fused_head`) the full logits are never made at all. Values and
gradients equal the per-token losses of :mod:`distill.train.losses` reduced by
:func:`~distill.train.losses.reduce_masked` (up to float rounding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.train.losses import (
    IGNORE_INDEX,
    KDLoss,
    ProjectedTeacher,
    Teacher,
    TopKTeacher,
    buckets_from_log_probs,
    cross_entropy_per_token,
    soften,
)

Head = tuple[Tensor, Tensor | None]  # (weight (V, D), bias (V,) or None)

# Config attributes with which an architecture rescales or caps logits after the projection.
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def fused_head(model: nn.Module) -> Head | str:
    """The output projection ``(weight, bias)`` when logits are exactly ``lm_head(h_last)``.

    ``h_last`` is ``hidden_states[-1]`` of a forward with ``output_hidden_states=True``. A
    tiny forward checks that identity numerically, so an architecture that post-processes
    logits in a way this function does not know by name is still caught.

    Returns:
        ``(weight, bias)``, or the reason the fused path cannot be used (a string).
    """
    config = getattr(model, "config", None)
    for attr in _LOGIT_POSTPROCESSING:
        value = getattr(config, attr, None)
        if value not in (None, 1, 1.0):
            return f"{type(model).__name__} post-processes logits (config.{attr}={value})"
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear):
        return f"{type(model).__name__}'s output embedding is {type(head).__name__}, not nn.Linear"
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ids = torch.arange(min(4, head.out_features), device=head.weight.device)[None]
            out = model(input_ids=ids, output_hidden_states=True)
            projected = head(out.hidden_states[-1]).float()
            logits = out.logits.float()
    except Exception as err:  # an architecture without hidden-state outputs
        return f"{type(model).__name__} forward with output_hidden_states failed: {err}"
    finally:
        model.train(was_training)
    scale = logits.abs().max().clamp_min(1.0)
    if projected.shape != logits.shape or (projected - logits).abs().max() > 1e-4 * scale:
        return f"{type(model).__name__}'s logits are not lm_head(last hidden state)"
    return head.weight, head.bias


@dataclass
class _ChunkSpec:
    targets: Tensor
    teacher: Teacher | ProjectedTeacher | None
    kd_loss: KDLoss
    kd_ratio: float
    num_tokens: float
    chunk_size: int


def _chunk_loss(
    logits: Tensor,
    targets: Tensor,
    teacher: Teacher | ProjectedTeacher | None,
    kd_loss: KDLoss,
    kd_ratio: float,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(objective, ce_sum, kd_sum)`` of one chunk of logits ``(c, V)``: the blended sum the
    gradient is taken of, and its CE and KD sums (``kd_sum`` None without a teacher)."""
    if teacher is not None and kd_loss.temperature == 1.0:
        # One log-softmax serves CE and KD: a (chunk, V) tensor fewer.
        ls = F.log_softmax(logits.float(), dim=-1)
        picked = -ls.gather(-1, targets.clamp_min(0)[:, None])[:, 0]
        ce_sum = torch.where(targets != IGNORE_INDEX, picked, 0.0).sum()
    else:
        ce_sum = cross_entropy_per_token(logits, targets).sum()
        ls = None
    objective = (1.0 - kd_ratio) * ce_sum
    if teacher is None:
        return objective, ce_sum, None
    if isinstance(teacher, ProjectedTeacher):
        teacher = teacher.logits()
    full = not isinstance(teacher, TopKTeacher)
    if full:  # normalised now so the chunk's teacher logits can go
        with torch.no_grad():
            teacher = F.log_softmax(soften(teacher, kd_loss.temperature), -1)
    if ls is None:
        ls = F.log_softmax(soften(logits, kd_loss.temperature), dim=-1)
    buckets = buckets_from_log_probs(ls, teacher, kd_loss.temperature, teacher_is_log_probs=full)
    kd_sum = kd_loss.from_log_probs(*buckets).sum()
    return objective + kd_ratio * kd_sum, ce_sum, kd_sum


class _HeadGrads:
    """Gradient accumulators for the inputs ``(N, D or V)``, the head weight ``(V, D)`` and
    bias ``(V,)``, filled one chunk at a time; None where no gradient is wanted."""

    def __init__(
        self, inputs: Tensor, weight: Tensor | None, bias: Tensor | None, wanted: tuple[bool, ...]
    ) -> None:
        self.weight = weight
        self.device = inputs.device
        self.want_w = weight is not None and wanted[1]
        self.grad_in = torch.zeros_like(inputs) if wanted[0] else None
        self.grad_w: Tensor | None = None  # (V, D) float32, made by the first chunk (no fill)
        want_b = bias is not None and wanted[2]
        self.grad_b = (
            torch.zeros(bias.shape, dtype=torch.float32, device=inputs.device) if want_b else None
        )

    def add(self, sl: slice, x: Tensor, g: Tensor) -> None:
        """Push chunk ``sl``'s gradient ``g`` w.r.t. its logits ``(c, V)`` through the head."""
        weight = self.weight
        if weight is None:
            if self.grad_in is not None:
                self.grad_in[sl] = g
            return
        # Gradients in the weights' precision, whatever autocast did to the logits.
        with torch.autocast(device_type=x.device.type, enabled=False):
            g = g.to(weight.dtype)
            if self.grad_in is not None:
                self.grad_in[sl] = g @ weight
            if self.want_w and self.grad_w is None:
                self.grad_w = g.t().float() @ x.float()
            elif self.want_w:
                self.grad_w.addmm_(g.t().float(), x.float())
            if self.grad_b is not None:
                self.grad_b += g.float().sum(0)

    def finish(self) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        if self.want_w and self.grad_w is None:  # no rows at all
            assert self.weight is not None
            self.grad_w = torch.zeros(self.weight.shape, dtype=torch.float32, device=self.device)
        return self.grad_in, self.grad_w, self.grad_b


class _ChunkedLoss(torch.autograd.Function):
    """Blended CE + KD over chunks of positions; gradients computed chunk by chunk in forward.

    For each chunk the logits ``(c, V)`` are made (from hidden states and the head, or
    sliced when already logits), the loss and its gradient with respect to those logits
    are computed, and the gradient is pushed through the head right away into ``(N, D)``
    and ``(V, D)`` accumulators; then the chunk is freed. Backward only scales the stored
    gradients by the incoming scalar. Against recomputing each chunk under
    ``torch.utils.checkpoint`` this has the same memory bound and skips the second head
    matmul (the approach of Liger's fused linear cross-entropy).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        inputs: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        spec: _ChunkSpec,
    ) -> tuple[Tensor, Tensor, Tensor]:
        device = inputs.device
        grads = _HeadGrads(inputs, weight, bias, ctx.needs_input_grad)
        denom = float(spec.num_tokens) if float(spec.num_tokens) > 0 else 1.0
        kd_loss = spec.kd_loss
        use_kd = spec.teacher is not None and spec.kd_ratio > 0.0
        ce_total = torch.zeros((), dtype=torch.float32, device=device)
        kd_total = torch.zeros((), dtype=torch.float32, device=device)
        for start in range(0, inputs.shape[0], spec.chunk_size):
            sl = slice(start, start + spec.chunk_size)
            x = inputs[sl].detach()
            with torch.enable_grad():
                if weight is None:
                    logits = x.requires_grad_(True)
                else:
                    with torch.no_grad():
                        logits = F.linear(x, weight, bias)
                    logits.requires_grad_(True)
                teacher = spec.teacher[sl] if use_kd else None
                objective, ce_sum, kd_sum = _chunk_loss(
                    logits, spec.targets[sl], teacher, kd_loss, spec.kd_ratio
                )
                del teacher
                if kd_sum is not None:
                    kd_total += kd_sum.detach()
                ce_total += ce_sum.detach()
                (g,) = torch.autograd.grad(objective / denom, logits)
            del logits, objective, ce_sum, kd_sum
            grads.add(sl, x, g)
            del g
        grad_in, grad_w, grad_b = grads.finish()
        ctx.save_for_backward(*(t for t in (grad_in, grad_w, grad_b) if t is not None))
        ctx.which = (grad_in is not None, grad_w is not None, grad_b is not None)
        ctx.dtypes = (
            None if weight is None else weight.dtype,
            None if bias is None else bias.dtype,
        )
        ce = ce_total / denom
        kd = kd_total / denom
        loss = (1.0 - spec.kd_ratio) * ce + spec.kd_ratio * kd
        ctx.mark_non_differentiable(ce, kd)
        return loss, ce, kd

    @staticmethod
    def backward(ctx: Any, g_loss: Tensor, *_: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        # Scaled in place: a second (V, D) buffer would cost as much as the head's weights.
        # The graph is not retained for a second backward, so the stored values are free.
        saved = list(ctx.saved_tensors)
        has_in, has_w, has_b = ctx.which
        grad_in = saved.pop(0).mul_(g_loss) if has_in else None
        grad_w = saved.pop(0).mul_(g_loss).to(ctx.dtypes[0]) if has_w else None
        grad_b = saved.pop(0).mul_(g_loss).to(ctx.dtypes[1]) if has_b else None
        return grad_in, grad_w, grad_b, None


def chunked_distill_loss(
    inputs: Tensor,
    targets: Tensor,
    teacher: Teacher | ProjectedTeacher | None,
    *,
    head: Head | None,
    kd_loss: KDLoss,
    kd_ratio: float,
    num_tokens: Tensor | float | int,
    chunk_size: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(1 - kd_ratio) * CE + kd_ratio * KD`` over scored positions, ``chunk_size`` at a time.

    Never holds more than one chunk of ``(chunk_size, V)`` logits or probabilities; with a
    ``head`` the student's full logits are never made either, and a
    :class:`ProjectedTeacher` makes the teacher's per chunk too. Same values and gradients
    as ``reduce_masked`` over the per-token losses (up to float rounding).

    Args:
        inputs: ``(N, D)`` student final hidden states when ``head`` is given, else ``(N, V)``
            logits; one row per scored position (the caller drops masked ones).
        targets: ``(N,)`` next-token ids.
        teacher: rows aligned with ``inputs``: ``(N, V)`` logits, a :class:`TopKTeacher`
            ``(N, k)``, a :class:`ProjectedTeacher` ``(N, Dt)``, or None (CE only).
        head: the student's output projection ``(weight (V, D), bias)`` or None.
        kd_loss: the divergence with its settings (:func:`distill.train.losses.make_kd_loss`):
            always named, so no setting falls back to a default here.
        num_tokens: the divisor (scored tokens in the accumulation window).

    Returns:
        ``(loss, ce, kd)`` scalars; only ``loss`` carries gradients.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size}: must be >= 1")
    weight, bias = head if head is not None else (None, None)
    spec = _ChunkSpec(targets, teacher, kd_loss, float(kd_ratio), float(num_tokens), chunk_size)
    return _ChunkedLoss.apply(inputs, weight, bias, spec)
