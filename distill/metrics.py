"""Next-token cross-entropy, perplexity, KL(teacher || model) and top-1 agreement: the one copy,
shared ground below every stage.

Every figure of model quality in distill comes from here: the evaluate report, training's
periodic eval, checkpoint selection, the layer search and quantize parity. The conventions:

* position ``t`` predicts ``tokens[:, t + 1]``, so a ``(B, T)`` block scores ``B * (T - 1)``
  positions; packed blocks have no padding to mask, while rows of different lengths (a
  prompt and what a model wrote after it) pass a ``mask`` marking the target tokens scored;
* log-probabilities are taken in fp32 whatever the model's dtype, and sums are kept in
  float64 on the host, divided once at the end (so the mean is exact across batch sizes);
* perplexity = exp(mean CE in nats); KL(teacher || model) is summed over the vocabulary per
  position and averaged over positions, in nats, with no temperature and no T² factor.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

# --------------------------------------------------------------------------------------------
# Blocks and models
# --------------------------------------------------------------------------------------------


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (where its inputs must go)."""
    return next(model.parameters()).device


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """``model.eval()`` for the block, then whatever mode the caller had."""
    # Dropout (GPT-2) would make scores random.
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def batches_of(blocks: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Consecutive ``(b, T)`` slices of ``blocks`` ``(N, T)``, b <= batch_size, in order."""
    return [blocks[i : i + batch_size] for i in range(0, blocks.shape[0], batch_size)]


def blocks_problem(blocks: torch.Tensor, batch_size: int) -> str | None:
    """Why ``blocks`` cannot be scored in batches of ``batch_size``, or None if they can.

    Callers raise their own error with it (and the fix that fits their stage).
    """
    if blocks.dim() != 2 or blocks.shape[0] < 1 or blocks.shape[1] < 2:
        return (
            f"blocks must be (N, T) token ids with N >= 1 and T >= 2, got shape "
            f"{tuple(blocks.shape)}"
        )
    if blocks.is_floating_point():
        return f"blocks must hold integer token ids, got {blocks.dtype}"
    if batch_size < 1:
        return f"batch_size={batch_size}: must be >= 1"
    return None


def forward_log_probs(model: Any, ids: torch.Tensor) -> torch.Tensor:
    """fp32 log-probabilities ``(b, T, V)`` of ``model`` on ``ids`` ``(b, T)`` (moved to it)."""
    logits = model(input_ids=ids.to(model_device(model)), use_cache=False).logits
    return F.log_softmax(logits.float(), dim=-1)


# --------------------------------------------------------------------------------------------
# Pure functions on tensors
# --------------------------------------------------------------------------------------------


def perplexity_from(ce_sum: float, num_tokens: int) -> float:
    """``exp(ce_sum / num_tokens)``: NaN when nothing was scored or the CE is NaN, ``inf``
    when it is beyond float range (``math.exp`` would raise OverflowError past ~709 nats)."""
    if not num_tokens:
        return math.nan
    mean = ce_sum / num_tokens
    try:
        return math.exp(mean)
    except OverflowError:
        return math.inf


def token_nll(log_probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``-log p(target)`` per position: ``(..., )`` from log-probs ``(..., V)`` and ids ``(..., )``.

    With ``log_probs[:, :-1]`` and ``tokens[:, 1:]`` this is the next-token cross-entropy.
    """
    targets = targets.to(log_probs.device)
    return -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def kl_per_position(teacher_lp: torch.Tensor, model_lp: torch.Tensor) -> torch.Tensor:
    """KL(teacher || model) per position ``(..., )`` from log-probs ``(..., V)``, in nats."""
    # One fused kernel for p * (log p - log q); half the passes over V of spelling it out.
    terms = F.kl_div(model_lp, teacher_lp, log_target=True, reduction="none")
    # Where the teacher gives a token probability 0 its term is 0, not 0 * (-inf) = NaN (a NaN
    # of the model's own still shows).
    return terms.masked_fill_(teacher_lp == float("-inf"), 0.0).sum(-1)


# The lowest finite fp32: log-probabilities clamped to it give 0 (not 0 * -inf = NaN) where the
# other factor is a probability of 0.
_LOWEST = torch.finfo(torch.float32).min


@dataclass(frozen=True)
class TeacherSide:
    """The teacher's half of every comparison at ``n`` scored positions, computed once.

    KL(teacher || model) = sum p log p - sum p log q: with the teacher's probabilities ``p``
    and its ``sum p log p`` kept, scoring a model is one product-sum over the vocabulary per
    position (no exp, no second argmax), a third of recomputing both from the teacher's
    log-probs for every model scored against them.

    Attributes:
        probs: ``(n, V)`` fp32 probabilities.
        neg_entropy: ``(n,)`` fp32 ``sum p log p``.
        top1: ``(n,)`` the teacher's most likely token.
    """

    probs: torch.Tensor
    neg_entropy: torch.Tensor
    top1: torch.Tensor

    @classmethod
    def of(cls, parts: Sequence[torch.Tensor]) -> TeacherSide:
        """From the teacher's log-probs ``(n_i, V)`` at consecutive positions, part by part
        (a row of a batch each): temporaries stay one part's size."""
        n, vocab = sum(p.shape[0] for p in parts), parts[0].shape[-1]
        like = parts[0]
        probs = torch.empty(n, vocab, dtype=torch.float32, device=like.device)
        neg_entropy = torch.empty(n, dtype=torch.float32, device=like.device)
        top1 = torch.empty(n, dtype=torch.long, device=like.device)
        start = 0
        for part in parts:
            end = start + part.shape[0]
            torch.exp(part.float(), out=probs[start:end])
            neg_entropy[start:end] = (probs[start:end] * part.float().clamp_min(_LOWEST)).sum(-1)
            top1[start:end] = part.argmax(-1)
            start = end
        return cls(probs, neg_entropy, top1)

    def __len__(self) -> int:
        return self.probs.shape[0]

    def __getitem__(self, rows: slice) -> TeacherSide:
        return TeacherSide(self.probs[rows], self.neg_entropy[rows], self.top1[rows])

    @property
    def vocab_size(self) -> int:
        return self.probs.shape[-1]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.probs, self.neg_entropy, self.top1))

    def to(self, device: torch.device | str) -> TeacherSide:
        if self.probs.device == torch.device(device):
            return self
        return TeacherSide(*(t.to(device) for t in (self.probs, self.neg_entropy, self.top1)))

    def split(self, sizes: Sequence[int]) -> list[TeacherSide]:
        """Consecutive parts of ``sizes`` positions each (views)."""
        out, start = [], 0
        for size in sizes:
            out.append(self[start : start + size])
            start += size
        return out

    def kl(self, model_lp: torch.Tensor) -> torch.Tensor:
        """KL(teacher || model) per position ``(n,)`` from the model's log-probs ``(n, V)``."""
        kl = self.neg_entropy - (self.probs * model_lp).sum(-1)
        bad = ~torch.isfinite(kl)
        if bad.any():  # 0 * -inf where the teacher gives 0: exact terms for those positions
            kl[bad] = kl_per_position(self.probs[bad].log(), model_lp[bad])
        return kl


@dataclass(frozen=True)
class ScoreSums:
    """Sums over scored positions; add them across batches, divide once at the end.

    Summing (not averaging per batch) keeps the means exact when batches differ in size.
    """

    ce_sum: float = 0.0
    kl_sum: float = 0.0
    top1_matches: int = 0
    num_tokens: int = 0

    def __add__(self, other: ScoreSums) -> ScoreSums:
        return ScoreSums(
            self.ce_sum + other.ce_sum,
            self.kl_sum + other.kl_sum,
            self.top1_matches + other.top1_matches,
            self.num_tokens + other.num_tokens,
        )

    @property
    def mean_ce(self) -> float:
        """Mean next-token cross-entropy in nats (NaN when nothing was scored)."""
        return self.ce_sum / self.num_tokens if self.num_tokens else math.nan

    @property
    def perplexity(self) -> float:
        """exp(mean CE); see :func:`perplexity_from`."""
        return perplexity_from(self.ce_sum, self.num_tokens)

    @property
    def kl(self) -> float:
        """Mean KL(teacher || model) per position, in nats."""
        return self.kl_sum / self.num_tokens if self.num_tokens else math.nan

    @property
    def top1(self) -> float:
        return self.top1_matches / self.num_tokens if self.num_tokens else math.nan


def quality_fields(sums: ScoreSums) -> dict[str, Any]:
    """A report row's quality figures from a model's :class:`ScoreSums` (every runtime's)."""
    return {
        "perplexity": sums.perplexity,
        "cross_entropy_nats": sums.mean_ce,
        "kl_to_teacher": sums.kl,
        "top1_agreement": sums.top1,
        "scored_tokens": sums.num_tokens,
    }


def score_positions(
    model_lp: torch.Tensor, teacher: TeacherSide | None, targets: torch.Tensor
) -> ScoreSums:
    """CE, KL(teacher || model) and top-1 agreement summed over already chosen positions.

    The core every scorer below reduces to, once it has picked the positions it scores.

    Args:
        model_lp: ``(n, V)`` fp32 log-probs of the evaluated model at the scored positions.
        teacher: the teacher at the same positions (any device); None when the model is the
            teacher (KL 0 and agreement 1 by construction, so only the CE is computed).
        targets: ``(n,)`` the token each position predicts.
    """
    n = int(targets.numel())
    ce_total = float(token_nll(model_lp, targets).double().sum())
    if teacher is None:
        return ScoreSums(ce_total, 0.0, n, n)
    teacher = teacher.to(model_lp.device)
    return ScoreSums(
        ce_sum=ce_total,
        kl_sum=float(teacher.kl(model_lp).double().sum()),
        top1_matches=int((model_lp.argmax(-1) == teacher.top1).sum()),
        num_tokens=n,
    )


def target_mask(mask: torch.Tensor) -> torch.Tensor:
    """Which of the ``T - 1`` predicting positions of ``(B, T)`` rows are scored: ``(B, T - 1)``
    bool, position ``t`` when ``mask[:, t + 1]`` (the mask marks the *target* tokens)."""
    return mask[:, 1:].bool()


def _check_shapes(
    model_lp: torch.Tensor,
    teacher_lp: torch.Tensor,
    tokens: torch.Tensor,
    mask: torch.Tensor | None,
) -> None:
    if model_lp.shape != teacher_lp.shape:
        raise ValueError(
            f"model logits {tuple(model_lp.shape)} and teacher logits "
            f"{tuple(teacher_lp.shape)} differ in shape"
        )
    if model_lp.dim() != 3 or tokens.shape != model_lp.shape[:2]:
        raise ValueError(
            f"expected logits (B, T, V) and tokens (B, T), got {tuple(model_lp.shape)} and "
            f"{tuple(tokens.shape)}"
        )
    if mask is not None and mask.shape != tokens.shape:
        raise ValueError(f"mask {tuple(mask.shape)} and tokens {tuple(tokens.shape)} differ")
    if tokens.shape[1] < 2:
        raise ValueError(f"need at least 2 tokens per row to score, got T={tokens.shape[1]}")


def score_log_probs(
    model_lp: torch.Tensor,
    teacher_lp: torch.Tensor | None,
    tokens: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> ScoreSums:
    """Next-token CE, KL(teacher || model) and top-1 agreement summed over a batch of
    log-probabilities (already normalised: nothing is renormalised here).

    Position ``t`` predicts ``tokens[:, t + 1]``, so ``T - 1`` positions per row are scored,
    or, with ``mask``, only those whose target token is marked (a completion after its
    prompt, with the prompt and padding masked). Sums are taken in float64 on the host.

    Args:
        model_lp: ``(B, T, V)`` the evaluated model's fp32 log-probabilities.
        teacher_lp: ``(B, T, V)`` the teacher's log-probabilities (any device); None when
            the model is the teacher (see :func:`score_positions`).
        tokens: ``(B, T)`` int64 token ids they were computed on.
        mask: ``(B, T)`` 1 where the token is a scored target (column 0 is never one); None
            scores every position.

    Raises:
        ValueError: shapes disagree, or ``T < 2`` (no next token to score).
    """
    _check_shapes(model_lp, model_lp if teacher_lp is None else teacher_lp, tokens, mask)
    model_lp = model_lp[:, :-1].float()
    if teacher_lp is not None:
        teacher_lp = teacher_lp[:, :-1].float().to(model_lp.device)
    targets = tokens[:, 1:].to(model_lp.device)
    keep = (
        target_mask(mask).to(model_lp.device)
        if mask is not None
        else torch.ones(targets.shape, dtype=torch.bool, device=model_lp.device)
    )
    side = TeacherSide.of([teacher_lp[keep]]) if teacher_lp is not None else None
    return score_positions(model_lp[keep], side, targets[keep])


def score_logits(
    logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    tokens: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> ScoreSums:
    """:func:`score_log_probs` of raw logits ``(B, T, V)``: both sides are normalised
    (fp32 ``log_softmax``) first. For two models' logits, as the parity check compares them.

    Raises:
        ValueError: as :func:`score_log_probs`.
    """
    _check_shapes(logits, teacher_logits, tokens, mask)
    return score_log_probs(
        F.log_softmax(logits.float(), dim=-1),
        F.log_softmax(teacher_logits.float(), dim=-1),
        tokens,
        mask,
    )


# --------------------------------------------------------------------------------------------
# Scoring a model over blocks
# --------------------------------------------------------------------------------------------


def ce_sum(logits: torch.Tensor, tokens: torch.Tensor) -> tuple[float, int]:
    """Summed next-token CE (nats) of ``logits`` ``(B, T, V)`` on ``tokens`` ``(B, T)``, and
    the ``B * (T - 1)`` positions it covers. CE only (no teacher): what perplexity needs."""
    log_probs = F.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = token_nll(log_probs, tokens[:, 1:])
    return float(nll.double().sum()), int(nll.numel())


def batch_ce_sum(model: Any, batch: torch.Tensor) -> tuple[float, int]:
    """:func:`ce_sum` of ``model`` on one ``(b, T)`` batch (moved to its device)."""
    logits = model(input_ids=batch.to(model_device(model)), use_cache=False).logits
    return ce_sum(logits, batch)


@torch.inference_mode()
def perplexity(model: Any, blocks: torch.Tensor, batch_size: int) -> float:
    """exp(mean next-token CE) of ``model`` over ``blocks`` ``(N, T)``, weighted per token.

    Scored in eval mode (the caller's mode is restored), ``batch_size`` blocks per forward.

    Raises:
        ValueError: ``blocks`` is not ``(N >= 1, T >= 2)`` integer ids or ``batch_size < 1``.
    """
    problem = blocks_problem(blocks, batch_size)
    if problem:
        raise ValueError(problem)
    total, count = 0.0, 0
    with eval_mode(model):
        for batch in batches_of(blocks, batch_size):
            s, c = batch_ce_sum(model, batch)
            total, count = total + s, count + c
    return perplexity_from(total, count)


@torch.inference_mode()
def teacher_sides(teacher: Any, blocks: torch.Tensor, batch_size: int) -> list[TeacherSide]:
    """The teacher's :class:`TeacherSide` per batch of :func:`batches_of` ``blocks``, on its
    device: the reference :func:`score_blocks` takes, computed once and reused."""
    sides: list[TeacherSide] = []
    score_blocks(teacher, blocks, batch_size, None, on_reference=sides.append)
    return sides


def trim_to_mask(batch: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` and ``mask`` ``(b, T)`` cut after the last marked column: right padding
    past every row's last target changes no scored position (causal attention), so it is
    not computed."""
    cols = mask.bool().any(0).nonzero()
    width = int(cols.max()) + 1 if cols.numel() else 2
    return batch[:, : max(width, 2)], mask[:, : max(width, 2)]


@torch.inference_mode()
def score_blocks(
    model: Any,
    blocks: torch.Tensor,
    batch_size: int,
    reference: Sequence[TeacherSide] | None,
    *,
    mask: torch.Tensor | None = None,
    on_reference: Callable[[TeacherSide], None] | None = None,
    desc: str | None = None,
) -> ScoreSums:
    """Score ``model`` on ``blocks`` ``(N, T)`` against the teacher's batches, in eval mode.

    Args:
        reference: the teacher per batch of :func:`batches_of`, at the batch's scored
            positions row by row (``b * (T - 1)`` of them without a mask), any device;
            ``None`` when ``model`` is the teacher itself (KL is then 0 and agreement 1 by
            construction).
        mask: ``(N, T)`` 1 on the target tokens to score (see :func:`score_logits`): rows of
            different lengths right-padded into ``blocks``, a prompt masked before its
            completion. None scores every position of the packed blocks.
        on_reference: called with each batch's :class:`TeacherSide` of ``model`` itself (how
            the teacher's reference is kept from the teacher's own pass).
        desc: a progress bar label; no bar when None.

    Raises:
        ValueError: the reference batches do not match ``blocks`` and ``batch_size``, or the
            mask is not ``blocks``' shape.
    """
    device = model_device(model)
    batches = batches_of(blocks, batch_size)
    if mask is not None and mask.shape != blocks.shape:
        raise ValueError(f"mask {tuple(mask.shape)} and blocks {tuple(blocks.shape)} differ")
    masks = batches_of(mask, batch_size) if mask is not None else [None] * len(batches)
    if reference is not None and len(reference) != len(batches):
        raise ValueError(
            f"{len(reference)} teacher batches for {len(batches)} batches of "
            f"{batch_size} blocks: compute them with the same blocks and batch size"
        )
    total = ScoreSums()
    bar = tqdm(total=blocks.shape[0], desc=desc, unit="block", leave=False, disable=desc is None)
    with eval_mode(model), bar:
        for i, (batch, batch_mask) in enumerate(zip(batches, masks, strict=True)):
            parts, targets = _scored_positions(model, batch.to(device), batch_mask)
            if on_reference is not None:
                on_reference(TeacherSide.of(parts))
            ref = None if reference is None else reference[i]
            if ref is not None and (
                len(ref) != sum(len(t) for t in targets) or ref.vocab_size != parts[0].shape[-1]
            ):
                raise ValueError(
                    f"teacher batch {i} has {len(ref)} positions of {ref.vocab_size} tokens, "
                    f"the model {sum(len(t) for t in targets)} of {parts[0].shape[-1]}: "
                    "vocabularies, blocks or masks differ"
                )
            sides = ref.split([len(t) for t in targets]) if ref is not None else [None] * len(parts)
            # One row's positions at a time: scoring makes fp32 temporaries the size of its
            # input, and at (B, T, V) they, not the model, would set the peak memory.
            for part, side, part_targets in zip(parts, sides, targets, strict=True):
                total = total + score_positions(part, side, part_targets)
            del parts  # the vocab-sized activations dominate memory
            bar.update(batch.shape[0])
    return total


def _scored_positions(
    model: Any, ids: torch.Tensor, mask: torch.Tensor | None
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``model``'s fp32 log-probs at the scored positions of ``ids`` ``(b, T)``, one
    ``(n_r, V)`` part per row (views; without a mask every ``T - 1`` predicting position),
    and each part's target tokens."""
    if mask is None:
        log_probs = forward_log_probs(model, ids)
        return list(log_probs[:, :-1].unbind(0)), list(ids[:, 1:].unbind(0))
    ids, mask = trim_to_mask(ids, mask)
    keep = target_mask(mask).to(ids.device)
    # Normalised at the scored positions only: (n, V).
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1][keep]
    log_probs = F.log_softmax(logits.float(), dim=-1)
    counts = keep.sum(1).tolist()
    return list(log_probs.split(counts)), list(ids[:, 1:][keep].split(counts))
