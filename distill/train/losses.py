"""Per-token losses and the one masked reducer (the chunked form is in chunked_loss.py).

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

The divergences are named once, in :data:`distill.names.LOSSES` (the values ``loss.name``
accepts); :data:`DIVERGENCES` implements exactly those names, checked at import.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.names import LOSSES

if TYPE_CHECKING:
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


def soften(logits: Tensor, temperature: float) -> Tensor:
    """``logits / temperature`` in float32."""
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
    ls = F.log_softmax(soften(student_logits, temperature), dim=-1)
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
        return ls, F.log_softmax(soften(teacher, temperature), dim=-1)
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


def forward_kl(ls: Tensor, lt: Tensor, kd: KDLoss) -> Tensor:
    """KL(p_teacher ‖ p_student): mass-covering, the classic KD loss."""
    return _kl(lt, ls)


def reverse_kl(ls: Tensor, lt: Tensor, kd: KDLoss) -> Tensor:
    """KL(p_student ‖ p_teacher): mode-seeking (MiniLLM). Against a top-k teacher it is the
    coarsest of the family: the student's mass outside the teacher's top-k is judged only as
    one lump."""
    return _kl(ls, lt)


def jsd(ls: Tensor, lt: Tensor, kd: KDLoss) -> Tensor:
    """Generalized Jensen-Shannon divergence (GKD), normalised so ``kd.beta`` interpolates the KLs.

    GKD's ``JSD_β = β KL(p_t ‖ m) + (1 - β) KL(p_s ‖ m)`` with ``m = β p_t + (1 - β) p_s``
    tends to 0 at both ends (``JSD_β ≈ β KL(p_t ‖ p_s)`` as β → 0 and
    ``≈ (1 - β) KL(p_s ‖ p_t)`` as β → 1). Dividing by ``β (1 - β)`` makes the loss
    continuous in β with exactly the limits GKD names: β = 0 is forward KL, β = 1 is
    reverse KL, and both endpoints are computed as those KLs (no log(0)). The gradient
    scale stays comparable across β, so ``kd_ratio`` means the same for any β. At β = 0.5
    the value is 4× the textbook JSD.
    """
    beta = kd.beta
    if beta == 0.0:
        return _kl(lt, ls)
    if beta == 1.0:
        return _kl(ls, lt)
    lm = _mixture(lt, ls, beta)
    return (beta * _kl(lt, lm) + (1.0 - beta) * _kl(ls, lm)) / (beta * (1.0 - beta))


def tvd(ls: Tensor, lt: Tensor, kd: KDLoss) -> Tensor:
    """Total variation distance ``0.5 * sum_v |p_t(v) - p_s(v)|``, in ``[0, 1]``."""
    return 0.5 * (lt.exp() - ls.exp()).abs().sum(-1)


def skew_kl(ls: Tensor, lt: Tensor, kd: KDLoss) -> Tensor:
    """Skew KL (DistiLLM): ``KL(p_t ‖ α p_t + (1 - α) p_s)`` with ``α = kd.alpha``.

    Mixing a little teacher into the student keeps the target's denominator away from 0, so
    the loss and its gradient stay bounded where the student puts no mass (``≤ -log α``);
    α = 0 is forward KL (computed exactly), α → 1 tends to 0.
    """
    return _kl(lt, ls if kd.alpha == 0.0 else _mixture(lt, ls, kd.alpha))


# Each maps student and teacher log-probabilities ``(..., buckets)`` to ``(...)``, unscaled.
DIVERGENCES: dict[str, Callable[[Tensor, Tensor, KDLoss], Tensor]] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": jsd,
    "tvd": tvd,
    "skew_kl": skew_kl,
}
if tuple(DIVERGENCES) != LOSSES:  # names.LOSSES is what loss.name accepts: keep them one list
    raise ImportError(f"DIVERGENCES {tuple(DIVERGENCES)} differ from distill.names.LOSSES {LOSSES}")


@dataclass(frozen=True)
class KDLoss:
    """One divergence of :data:`DIVERGENCES` with its settings bound.

    Called as ``kd(student_logits (B, T, V), teacher) -> (B, T)`` float32 (teacher: logits
    ``(B, T, V)`` or :class:`TopKTeacher`), both softened by ``temperature``; with
    ``scale_by_t2`` the result is multiplied by ``temperature**2``. :meth:`from_log_probs`
    takes bucket log-probabilities instead, so the chunked loss can share one student
    log-softmax between CE and KD. ``beta`` is read by ``jsd`` (in ``[0, 1]``), ``alpha`` by
    ``skew_kl`` (in ``[0, 1)``).

    Raises:
        ValueError: on call, for a ``name`` not in :data:`DIVERGENCES`.
    """

    name: str  # always given: no divergence is chosen for the user
    temperature: float = 1.0
    scale_by_t2: bool = True
    beta: float = 0.5
    alpha: float = 0.1

    def __call__(self, student_logits: Tensor, teacher: Teacher) -> Tensor:
        ls, lt = bucket_log_probs(student_logits, teacher, self.temperature)
        return self.from_log_probs(ls, lt)

    def from_log_probs(self, ls: Tensor, lt: Tensor) -> Tensor:
        """Divergence ``(...)`` between student ``ls`` and teacher ``lt`` ``(..., buckets)``."""
        divergence = DIVERGENCES.get(self.name)
        if divergence is None:
            raise ValueError(f"unknown loss {self.name!r}: choose one of {', '.join(LOSSES)}")
        div = divergence(ls, lt, self)
        return div * (self.temperature**2) if self.scale_by_t2 else div


def make_kd_loss(cfg: LossConfig) -> KDLoss:
    """The configured divergence, ``(student_logits, teacher) -> (B, T)``, settings bound."""
    return KDLoss(cfg.name, cfg.temperature, cfg.scale_by_t2, cfg.beta, cfg.alpha)
