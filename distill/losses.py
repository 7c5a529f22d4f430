"""Per-token losses and the one masked reducer.

Every function here maps logits ``(B, T, V)`` to a per-token loss ``(B, T)`` in float32; the
loop reduces them with :func:`reduce_masked`, dividing by a token count it supplies. Keeping
the reduction out of the losses is what makes gradient accumulation exact: the count is
taken over the whole accumulation window, not per micro-batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


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
    """Next-token cross-entropy ``(B, T)`` in float32; ignored targets give 0."""
    b, t, v = logits.shape
    safe = targets.clamp_min(0)
    ce = F.cross_entropy(logits.reshape(b * t, v).float(), safe.reshape(b * t), reduction="none")
    return torch.where(targets != IGNORE_INDEX, ce.view(b, t), torch.zeros_like(ce.view(b, t)))


def forward_kl_per_token(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    scale_by_t2: bool = True,
) -> Tensor:
    """KL(p_teacher ‖ p_student) per position, both softened by ``temperature``.

    ``sum_v p_t(v) (log p_t(v) - log p_s(v))`` with ``p = softmax(logits / temperature)``,
    computed in float32. With ``scale_by_t2`` the result is multiplied by ``temperature**2``
    so the gradient magnitude does not shrink as the temperature grows (Hinton et al.).

    Args:
        student_logits, teacher_logits: ``(B, T, V)``.

    Returns:
        ``(B, T)`` float32, non-negative.
    """
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = (t.exp() * (t - s)).sum(-1)
    if scale_by_t2:
        kl = kl * (temperature**2)
    return kl


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
