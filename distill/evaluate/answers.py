"""Scoring what a model wrote: its answers padded into scoreable rows, the teacher's NLL of
them, and how much of them repeats.

Used by the fidelity sets (:mod:`distill.evaluate.fidelity`): the teacher's own text is
scored like this for every variant, and every variant's greedy answers are scored by the
teacher.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from distill.metrics import score_blocks

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from distill.teacher_text import Sample


def pad_rows(
    prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each prompt + completion as right-padded rows ``(N, T)`` and the mask ``(N, T)`` of the
    completion tokens: what :func:`~distill.metrics.score_blocks` scores with ``mask``.

    Right padding sits after every scored position, so causal attention never sees it.
    """
    width = max(len(p) + len(c) for p, c in zip(prompts, completions, strict=True))
    tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        row = list(p) + list(c)
        tokens[r, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[r, len(p) : len(row)] = 1
    return tokens, mask


def pad_samples(samples: Sequence[Sample], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`pad_rows` of the samples' prompts and completions."""
    return pad_rows([s.prompt for s in samples], [s.completion for s in samples], pad_id)


def answers_nll(
    teacher: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    answers: Sequence[Sequence[int]],
    batch_size: int,
) -> tuple[float, int]:
    """The teacher's mean per-token NLL (nats) of ``answers`` given their ``prompts``, and
    the answer tokens scored: the CE of :func:`score_blocks` with the prompts masked."""
    tokens, mask = pad_rows(prompts, answers)
    sums = score_blocks(teacher, tokens, batch_size, None, mask=mask)
    return sums.mean_ce, sums.num_tokens


def repeated_ngram_share(answers: Sequence[Sequence[int]], n: int = 4) -> float:
    """The share of the answers' token ``n``-grams that already occurred earlier in the same
    answer: 0 for text that never repeats itself, near 1 for a loop.

    Why it sits beside the teacher's NLL: once a loop starts, every further copy of it is easy
    to predict, so a model that loops gets a flattering NLL; this figure shows the loop.
    """
    seen_total = repeated = 0
    for answer in answers:
        seen: set[tuple[int, ...]] = set()
        for i in range(len(answer) - n + 1):
            gram = tuple(answer[i : i + n])
            repeated += gram in seen
            seen.add(gram)
            seen_total += 1
    return repeated / seen_total if seen_total else float("nan")
