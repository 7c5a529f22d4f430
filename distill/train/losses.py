"""Per-token losses, the one masked reducer, and the memory-bounded (chunked, fused) form.

Every divergence here maps student logits ``(B, T, V)`` and a teacher to a per-token loss
``(B, T)`` in float32; the loop reduces them with :func:`reduce_masked`, dividing by a token
count it supplies. Keeping the reduction out of the losses is what makes gradient
accumulation exact: the count is taken over the whole accumulation window, not per
micro-batch.

The teacher is either full logits ``(B, T, V)`` or a :class:`TopKTeacher` (its ``k`` most
probable tokens plus the log-mass of the rest, as the teacher cache stores it). Every loss
accepts both: with a top-k teacher the two distributions compared are the ``k + 1``-way ones
over the teacher's top-k tokens plus one "rest" bucket, whose student mass is the student's
probability of every other token. That is a coarsening of the full distributions, so each
divergence is a lower bound of its full-vocabulary value (data-processing inequality),
exact when ``k = V``; unlike renormalising over the top-k alone, the student is still
pushed to leave the teacher's tail mass where the teacher puts it.

Temperature softens both distributions in every loss. ``scale_by_t2`` multiplies the result
by ``temperature**2`` (Hinton et al.): the gradient of a divergence between softened
distributions shrinks like ``1/T**2``, and the factor keeps the KD term's weight in
``(1 - kd_ratio) * ce + kd_ratio * kd`` independent of ``T``. It is applied the same way to
every loss, so the switch means one thing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.config import LossConfig

IGNORE_INDEX = -100
# Stands in for log(0) in bucket distributions: exp() of it is exactly 0 in float32 and
# differences with it stay finite, so an empty bucket adds 0 and passes no NaN gradient.
LOG_ZERO = -1.0e4


# --------------------------------------------------------------------------------------------
# Alignment, cross-entropy, reduction
# --------------------------------------------------------------------------------------------


def shift_for_next_token(
    logits: Tensor, labels: Tensor, mask: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Align position ``t``'s logits with token ``t+1``.

    Args:
        logits: ``(B, T, V)``.
        labels: ``(B, T)`` token ids; ``IGNORE_INDEX`` marks positions without a target.
        mask: ``(B, T)`` bool, True for real tokens (padding False); None means all real.

    Returns:
        ``(B, T-1, V)`` logits, ``(B, T-1)`` targets, ``(B, T-1)`` bool mask of scored positions.
    """
    return logits[:, :-1], labels[:, 1:], scored_positions(labels, mask)


def scored_positions(labels: Tensor, mask: Tensor | None = None) -> Tensor:
    """``(B, T-1)`` bool: positions whose next token is a real, non-ignored target."""
    valid = labels[:, 1:] != IGNORE_INDEX
    if mask is not None:
        valid = valid & mask[:, 1:].bool() & mask[:, :-1].bool()
    return valid


def cross_entropy_per_token(logits: Tensor, targets: Tensor) -> Tensor:
    """Next-token cross-entropy ``(..., )`` in float32 for logits ``(..., V)``; ignored targets
    give 0."""
    v = logits.shape[-1]
    safe = targets.clamp_min(0)
    ce = F.cross_entropy(logits.reshape(-1, v).float(), safe.reshape(-1), reduction="none")
    ce = ce.view(targets.shape)
    return torch.where(targets != IGNORE_INDEX, ce, torch.zeros_like(ce))


def reduce_masked(per_token: Tensor, mask: Tensor, num_tokens: Tensor | float | int) -> Tensor:
    """``sum(per_token * mask) / num_tokens``; an all-masked batch gives 0, never NaN.

    Args:
        per_token: ``(B, T)``.
        mask: ``(B, T)`` bool or 0/1.
        num_tokens: the count to divide by, usually the number of scored tokens in the whole
            accumulation window (across processes), so micro-batches add up exactly.
    """
    # where(), not a product: a NaN at a padded position must not leak into the sum.
    total = torch.where(mask.bool(), per_token, torch.zeros_like(per_token)).sum()
    denom = torch.as_tensor(num_tokens, dtype=per_token.dtype, device=per_token.device)
    return total / denom.clamp_min(1.0)


# --------------------------------------------------------------------------------------------
# Teacher representations
# --------------------------------------------------------------------------------------------


@dataclass
class TopKTeacher:
    """A teacher distribution as its ``k`` most probable tokens plus the mass of the rest.

    Attributes:
        logprobs: ``(..., k)`` float, ``log p_t(v)`` of the top-k tokens, already softened by
            the loss temperature (the cache is keyed by it).
        ids: ``(..., k)`` integer token ids of those tokens.
        tail: ``(...)`` float, ``log(1 - sum(top-k p_t))``; ``LOG_ZERO`` (or -inf) when
            ``k = V``.
    """

    logprobs: Tensor
    ids: Tensor
    tail: Tensor

    def __getitem__(self, index: Any) -> TopKTeacher:
        """Index the leading (position) dimensions, e.g. with a ``(B, T)`` bool mask."""
        return TopKTeacher(self.logprobs[index], self.ids[index], self.tail[index])

    def to(self, device: torch.device | str) -> TopKTeacher:
        return TopKTeacher(self.logprobs.to(device), self.ids.to(device), self.tail.to(device))

    @classmethod
    def from_logits(cls, logits: Tensor, k: int, temperature: float = 1.0) -> TopKTeacher:
        """The top-``k`` view of full teacher logits ``(..., V)`` at ``temperature``."""
        lp = F.log_softmax(logits.float() / temperature, dim=-1)
        values, ids = lp.topk(k, dim=-1)
        # The rest's log-mass summed directly over the other tokens, not log(1 - top mass):
        # that difference cancels catastrophically when the top-k hold nearly everything.
        tail = torch.logsumexp(lp.scatter(-1, ids, float("-inf")), dim=-1)
        return cls(values, ids, tail.clamp_min(LOG_ZERO))


@dataclass
class ProjectedTeacher:
    """Teacher final hidden states ``(..., D)`` and its output projection, so teacher logits
    can be made one chunk of positions at a time instead of all at once."""

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None = None

    def __getitem__(self, index: Any) -> ProjectedTeacher:
        return ProjectedTeacher(self.hidden[index], self.weight, self.bias)

    def logits(self) -> Tensor:
        with torch.no_grad():
            return F.linear(self.hidden, self.weight, self.bias)


Teacher = Tensor | TopKTeacher


def _soften(logits: Tensor, temperature: float) -> Tensor:
    # No division at T = 1: it would copy a (tokens, vocab) tensor for nothing.
    return logits.float() if temperature == 1.0 else logits.float() / temperature


def bucket_log_probs(
    student_logits: Tensor, teacher: Teacher, temperature: float
) -> tuple[Tensor, Tensor]:
    """Student and teacher log-probabilities over the same buckets, float32, at ``temperature``.

    Full teacher logits: the ``V`` tokens. :class:`TopKTeacher`: its ``k`` tokens plus one
    rest bucket (last), the teacher's renormalised so the ``k + 1`` buckets sum to 1 despite
    the cache's float16 rounding.

    Returns:
        ``(student, teacher)``, each ``(..., V)`` or ``(..., k + 1)``.
    """
    ls = F.log_softmax(_soften(student_logits, temperature), dim=-1)
    return buckets_from_log_probs(ls, teacher, temperature)


def buckets_from_log_probs(
    student_log_probs: Tensor,
    teacher: Teacher,
    temperature: float,
    *,
    teacher_is_log_probs: bool = False,
) -> tuple[Tensor, Tensor]:
    """:func:`bucket_log_probs` from the student's full log-probabilities ``(..., V)``;
    with ``teacher_is_log_probs`` a full teacher is taken as already softened log-probs."""
    ls = student_log_probs
    if not isinstance(teacher, TopKTeacher):
        if teacher_is_log_probs:
            return ls, teacher
        return ls, F.log_softmax(_soften(teacher, temperature), dim=-1)
    ids = teacher.ids.long()
    top = ls.gather(-1, ids)
    # Summed over the other tokens, not log(1 - top mass), which cancels catastrophically
    # when the top-k hold nearly everything. LOG_ZERO rather than -inf: with k = V every
    # token is filled, and logsumexp's backward of an all -inf row is NaN.
    rest = torch.logsumexp(ls.scatter(-1, ids, LOG_ZERO), dim=-1, keepdim=True)
    lt = torch.cat(
        [teacher.logprobs.float(), teacher.tail.float().clamp_min(LOG_ZERO)[..., None]], -1
    )
    lt = lt - torch.logsumexp(lt, dim=-1, keepdim=True)
    return torch.cat([top, rest], -1), lt


# --------------------------------------------------------------------------------------------
# Divergences between log-probability tensors (last dim = buckets)
# --------------------------------------------------------------------------------------------


def _kl(lp: Tensor, lq: Tensor) -> Tensor:
    """KL(p ‖ q) = sum p log p - sum p log q, as two dot products: no (tokens, vocab)
    difference or product tensor is kept for backward, only ``p`` itself."""
    p = lp.exp()
    return torch.linalg.vecdot(p, lp) - torch.linalg.vecdot(p, lq)


def _mixture(lt: Tensor, ls: Tensor, w: float) -> Tensor:
    """``log(w p_t + (1 - w) p_s)`` for ``0 < w < 1``."""
    return torch.logaddexp(lt + math.log(w), ls + math.log1p(-w))


def _jsd(ls: Tensor, lt: Tensor, beta: float) -> Tensor:
    if beta == 0.0:
        return _kl(lt, ls)
    if beta == 1.0:
        return _kl(ls, lt)
    lm = _mixture(lt, ls, beta)
    return (beta * _kl(lt, lm) + (1.0 - beta) * _kl(ls, lm)) / (beta * (1.0 - beta))


def _skew_kl(ls: Tensor, lt: Tensor, alpha: float) -> Tensor:
    return _kl(lt, ls if alpha == 0.0 else _mixture(lt, ls, alpha))


@dataclass(frozen=True)
class KDLoss:
    """One divergence of the family with its settings bound.

    Called as ``kd(student_logits (B, T, V), teacher) -> (B, T)`` float32 (teacher: logits
    ``(B, T, V)`` or :class:`TopKTeacher`); :meth:`from_log_probs` takes bucket
    log-probabilities instead, so the chunked loss can share one student log-softmax
    between CE and KD.
    """

    name: str = "forward_kl"
    temperature: float = 1.0
    scale_by_t2: bool = True
    beta: float = 0.5
    alpha: float = 0.1

    def __call__(self, student_logits: Tensor, teacher: Teacher) -> Tensor:
        ls, lt = bucket_log_probs(student_logits, teacher, self.temperature)
        return self.from_log_probs(ls, lt)

    def from_log_probs(self, ls: Tensor, lt: Tensor) -> Tensor:
        """Divergence ``(...)`` between student ``ls`` and teacher ``lt`` ``(..., buckets)``."""
        if self.name == "forward_kl":
            div = _kl(lt, ls)
        elif self.name == "reverse_kl":
            div = _kl(ls, lt)
        elif self.name == "jsd":
            div = _jsd(ls, lt, self.beta)
        elif self.name == "tvd":
            div = 0.5 * (lt.exp() - ls.exp()).abs().sum(-1)
        elif self.name == "skew_kl":
            div = _skew_kl(ls, lt, self.alpha)
        else:
            raise ValueError(f"unknown loss {self.name!r}: choose one of {sorted(LOSS_FUNCTIONS)}")
        return div * (self.temperature**2) if self.scale_by_t2 else div


def forward_kl_per_token(
    student_logits: Tensor,
    teacher: Teacher,
    *,
    temperature: float = 1.0,
    scale_by_t2: bool = True,
) -> Tensor:
    """KL(p_teacher ‖ p_student) per position: mass-covering, the classic KD loss.

    ``sum_v p_t(v) (log p_t(v) - log p_s(v))`` with ``p = softmax(logits / temperature)``,
    computed in float32. With ``scale_by_t2`` the result is multiplied by ``temperature**2``.

    Args:
        student_logits: ``(B, T, V)``.
        teacher: ``(B, T, V)`` logits or a :class:`TopKTeacher` of ``(B, T, k)``.

    Returns:
        ``(B, T)`` float32, non-negative.
    """
    return KDLoss("forward_kl", temperature, scale_by_t2)(student_logits, teacher)


def reverse_kl_per_token(
    student_logits: Tensor,
    teacher: Teacher,
    *,
    temperature: float = 1.0,
    scale_by_t2: bool = True,
) -> Tensor:
    """KL(p_student ‖ p_teacher) per position: mode-seeking (MiniLLM).

    Args and returns as :func:`forward_kl_per_token`; the T² factor is applied when
    ``scale_by_t2``. Against a top-k teacher it is the coarsest of the family: the student's
    mass outside the teacher's top-k is judged only as one lump.
    """
    return KDLoss("reverse_kl", temperature, scale_by_t2)(student_logits, teacher)


def jsd_per_token(
    student_logits: Tensor,
    teacher: Teacher,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    scale_by_t2: bool = True,
) -> Tensor:
    """Generalized Jensen-Shannon divergence (GKD), normalised so ``beta`` interpolates the KLs.

    GKD's ``JSD_β = β KL(p_t ‖ m) + (1 - β) KL(p_s ‖ m)`` with ``m = β p_t + (1 - β) p_s``
    tends to 0 at both ends (``JSD_β ≈ β KL(p_t ‖ p_s)`` as β → 0 and
    ``≈ (1 - β) KL(p_s ‖ p_t)`` as β → 1). Dividing by ``β (1 - β)`` makes the loss
    continuous in β with exactly the limits GKD names: β = 0 is forward KL, β = 1 is
    reverse KL, and both endpoints are computed as those KLs (no log(0)). The gradient
    scale stays comparable across β, so ``kd_ratio`` means the same for any β. At β = 0.5
    the value is 4× the textbook JSD.

    Args and returns as :func:`forward_kl_per_token`; ``beta`` in ``[0, 1]``. The T²
    factor is applied when ``scale_by_t2``.
    """
    return KDLoss("jsd", temperature, scale_by_t2, beta=beta)(student_logits, teacher)


def tvd_per_token(
    student_logits: Tensor,
    teacher: Teacher,
    *,
    temperature: float = 1.0,
    scale_by_t2: bool = True,
) -> Tensor:
    """Total variation distance ``0.5 * sum_v |p_t(v) - p_s(v)|`` per position, in ``[0, 1]``.

    Args and returns as :func:`forward_kl_per_token`; the T² factor is applied when
    ``scale_by_t2``.
    """
    return KDLoss("tvd", temperature, scale_by_t2)(student_logits, teacher)


def skew_kl_per_token(
    student_logits: Tensor,
    teacher: Teacher,
    *,
    alpha: float = 0.1,
    temperature: float = 1.0,
    scale_by_t2: bool = True,
) -> Tensor:
    """Skew KL (DistiLLM): ``KL(p_t ‖ α p_t + (1 - α) p_s)``.

    Mixing a little teacher into the student keeps the target's denominator away from 0, so
    the loss and its gradient stay bounded where the student puts no mass (``≤ -log α``);
    α = 0 is forward KL (computed exactly), α → 1 tends to 0.

    Args and returns as :func:`forward_kl_per_token`; ``alpha`` in ``[0, 1)``. The T²
    factor is applied when ``scale_by_t2``.
    """
    return KDLoss("skew_kl", temperature, scale_by_t2, alpha=alpha)(student_logits, teacher)


LOSS_FUNCTIONS: dict[str, Callable[..., Tensor]] = {
    "forward_kl": forward_kl_per_token,
    "reverse_kl": reverse_kl_per_token,
    "jsd": jsd_per_token,
    "tvd": tvd_per_token,
    "skew_kl": skew_kl_per_token,
}


def make_kd_loss(cfg: LossConfig) -> KDLoss:
    """The configured divergence, ``(student_logits, teacher) -> (B, T)``, settings bound."""
    return KDLoss(cfg.name, cfg.temperature, cfg.scale_by_t2, cfg.beta, cfg.alpha)


# --------------------------------------------------------------------------------------------
# The memory-bounded form: chunks of positions, fused with the output projection
# --------------------------------------------------------------------------------------------

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
        n = inputs.shape[0]
        device = inputs.device
        want_in = ctx.needs_input_grad[0]
        want_w = weight is not None and ctx.needs_input_grad[1]
        want_b = bias is not None and ctx.needs_input_grad[2]
        grad_in = torch.zeros_like(inputs) if want_in else None
        grad_w = None  # (V, D) float32, made by the first chunk's product (no zero fill)
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=device) if want_b else None
        denom = float(spec.num_tokens) if float(spec.num_tokens) > 0 else 1.0
        kd_loss = spec.kd_loss or KDLoss()
        use_kd = spec.teacher is not None and spec.kd_ratio > 0.0
        ce_total = torch.zeros((), dtype=torch.float32, device=device)
        kd_total = torch.zeros((), dtype=torch.float32, device=device)
        for start in range(0, n, spec.chunk_size):
            sl = slice(start, start + spec.chunk_size)
            x = inputs[sl].detach()
            with torch.enable_grad():
                if weight is None:
                    logits = x.requires_grad_(True)
                else:
                    with torch.no_grad():
                        logits = F.linear(x, weight, bias)
                    logits.requires_grad_(True)
                targets = spec.targets[sl]
                if use_kd and kd_loss.temperature == 1.0:
                    # One log-softmax serves CE and KD: a (chunk, V) tensor fewer.
                    ls = F.log_softmax(logits.float(), dim=-1)
                    picked = -ls.gather(-1, targets.clamp_min(0)[:, None])[:, 0]
                    ce_sum = torch.where(targets != IGNORE_INDEX, picked, 0.0).sum()
                else:
                    ce_sum = cross_entropy_per_token(logits, targets).sum()
                    ls = None
                objective = (1.0 - spec.kd_ratio) * ce_sum
                if use_kd:
                    teacher = spec.teacher[sl]
                    if isinstance(teacher, ProjectedTeacher):
                        teacher = teacher.logits()
                    full = not isinstance(teacher, TopKTeacher)
                    if full:  # normalised now so the chunk's teacher logits can go
                        with torch.no_grad():
                            teacher = F.log_softmax(_soften(teacher, kd_loss.temperature), -1)
                    if ls is None:
                        ls = F.log_softmax(_soften(logits, kd_loss.temperature), dim=-1)
                    buckets = buckets_from_log_probs(
                        ls, teacher, kd_loss.temperature, teacher_is_log_probs=full
                    )
                    del teacher
                    kd_sum = kd_loss.from_log_probs(*buckets).sum()
                    del buckets
                    objective = objective + spec.kd_ratio * kd_sum
                    kd_total += kd_sum.detach()
                ce_total += ce_sum.detach()
                (g,) = torch.autograd.grad(objective / denom, logits)
            del logits, objective, ls
            if weight is None:
                if grad_in is not None:
                    grad_in[sl] = g
            else:
                # Gradients in the weights' precision, whatever autocast did to the logits.
                with torch.autocast(device_type=device.type, enabled=False):
                    g = g.to(weight.dtype)
                    if grad_in is not None:
                        grad_in[sl] = g @ weight
                    if want_w and grad_w is None:
                        grad_w = g.t().float() @ x.float()
                    elif want_w:
                        grad_w.addmm_(g.t().float(), x.float())
                    if grad_b is not None:
                        grad_b += g.float().sum(0)
            del g
        if want_w and grad_w is None:  # no rows at all
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=device)
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


@dataclass
class _ChunkSpec:
    targets: Tensor
    teacher: Teacher | ProjectedTeacher | None
    kd_loss: KDLoss | None
    kd_ratio: float
    num_tokens: float
    chunk_size: int


def chunked_distill_loss(
    inputs: Tensor,
    targets: Tensor,
    teacher: Teacher | ProjectedTeacher | None,
    *,
    head: Head | None,
    kd_loss: KDLoss | None,
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
        kd_loss: the divergence (:func:`make_kd_loss`); None: forward KL at T = 1.
        num_tokens: the divisor (scored tokens in the accumulation window).

    Returns:
        ``(loss, ce, kd)`` scalars; only ``loss`` carries gradients.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size}: must be >= 1")
    weight, bias = head if head is not None else (None, None)
    spec = _ChunkSpec(targets, teacher, kd_loss, float(kd_ratio), float(num_tokens), chunk_size)
    return _ChunkedLoss.apply(inputs, weight, bias, spec)
