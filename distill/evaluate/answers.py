"""Scoring what a model wrote: its answers padded into scoreable rows, the teacher's NLL of
them, how much of them repeats, and the answer sets (:class:`AnswerSet`) built of these.

Used by the fidelity sets (:mod:`distill.evaluate.fidelity`): the teacher's own text is
scored like this for every variant, and every variant's greedy answers to the same prompts
are scored by the teacher (:class:`TeacherJudge`, which reads each prompt once and keeps its
KV cache, so a variant's answers cost the teacher only their own tokens).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from distill.metrics import eval_mode, token_nll
from distill.sampling import cache_keyword

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from distill.teacher_text import Sample


@contextmanager
def embedding_table_once(model: torch.nn.Module) -> Iterator[bool]:
    """While active, a quantized input embedding looks rows up in its table dequantized once.

    torchao's quantized tensors run ``embedding`` as "dequantize the whole table, then look
    up" on every call: 134 ms a forward for SmolLM2's 49,152 x 576 table in int8, three
    quarters of an eager int8 decode step. Looking the same rows up in the table dequantized
    once gives the same values, which is checked here bit for bit on a sample of rows before
    anything uses it; if they differ, or the table is a plain tensor, nothing changes. Yields
    whether the table was swapped. For quality passes (answers, scoring), never for timing:
    a timed model runs as it was loaded.
    """
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    embedding = model.get_input_embeddings()
    weight = embedding.weight
    if not isinstance(embedding, torch.nn.Embedding) or not is_traceable_wrapper_subclass(
        weight.data if isinstance(weight, torch.nn.Parameter) else weight
    ):
        yield False
        return
    with torch.inference_mode():
        table = weight.dequantize()
        probe = torch.arange(0, table.shape[0], max(1, table.shape[0] // 97), device=table.device)
        same = torch.equal(F.embedding(probe, table), embedding(probe))
    if not same:
        yield False
        return
    embedding.forward = lambda ids: F.embedding(ids, table, embedding.padding_idx)
    try:
        yield True
    finally:
        del embedding.forward  # the class's own forward again (and the table with it)


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


class TeacherJudge:
    """The teacher's NLL of answers to a fixed set of prompts, each prompt read once.

    Every prompt's KV cache and its last position's log-probabilities (the first answer
    token's) are computed at construction; :meth:`nll` then runs the teacher over the answer
    tokens alone, on a copy of that prompt's cache. The figure is the CE of a plain forward
    over prompt + answer with the prompt masked (up to float rounding: the same positions,
    the same model), at a fraction of its cost when every variant answers the same prompts.
    """

    def __init__(self, teacher: PreTrainedModel, prompts: Sequence[Sequence[int]]) -> None:
        self.teacher = teacher
        self.device = next(teacher.parameters()).device
        self._cache = cache_keyword(teacher)
        self._prompts: list[tuple[object, torch.Tensor]] = []
        with torch.inference_mode(), eval_mode(teacher):
            for prompt in prompts:
                ids = torch.tensor([list(prompt)], device=self.device)
                out = teacher(input_ids=ids, use_cache=True)
                first = F.log_softmax(out.logits[0, -1].float(), dim=-1)
                self._prompts.append((out[self._cache], first))

    def nll(self, answers: Sequence[Sequence[int]]) -> tuple[float, int]:
        """Mean per-token NLL (nats) of ``answers`` (one per prompt, in order) and the answer
        tokens scored; NaN and 0 when every answer is empty."""
        if len(answers) != len(self._prompts):
            raise ValueError(f"{len(answers)} answers for {len(self._prompts)} prompts")
        total, count = 0.0, 0
        with torch.inference_mode(), eval_mode(self.teacher):
            for (cache, first), answer in zip(self._prompts, answers, strict=True):
                if not answer:
                    continue
                total -= float(first[answer[0]])
                if len(answer) > 1:
                    ids = torch.tensor([list(answer[:-1])], device=self.device)
                    kwargs = {self._cache: copy.deepcopy(cache)}
                    out = self.teacher(input_ids=ids, use_cache=True, **kwargs)
                    log_probs = F.log_softmax(out.logits[0].float(), dim=-1)
                    targets = torch.tensor(list(answer[1:]), device=self.device)
                    total += float(token_nll(log_probs, targets).double().sum())
                count += len(answer)
        return (total / count if count else float("nan")), count


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


@dataclass
class AnswerSet:
    """Prompts every variant answers greedily (up to ``max_new_tokens``), the teacher judging
    the answers (:class:`TeacherJudge`), and the teacher's figures for its own answers."""

    name: str
    prompts: list[tuple[int, ...]]
    max_new_tokens: int
    description: str
    judge: TeacherJudge | None
    teacher_nll: float
    teacher_answer_tokens: int
    teacher_repeats: float
    # The teacher's own greedy answers: what a variant drafting for it must guess
    # (distill/evaluate/draft.py).
    teacher_answers: list[tuple[int, ...]] = field(default_factory=list)

    def fields(self, answers: Sequence[Sequence[int]]) -> dict[str, Any]:
        """A variant's figures for its ``answers`` (one per prompt, in order)."""
        assert self.judge is not None, "released"
        nll, count = self.judge.nll(answers)
        return {
            "teacher_nll": nll,
            "teacher_nll_ratio": nll / self.teacher_nll if self.teacher_nll else None,
            "repeated_4grams": repeated_ngram_share(answers),
            "answer_tokens": count,
            "prompts": len(answers),
        }

    def teacher_fields(self) -> dict[str, Any]:
        """The teacher's own row: its answers, the reference of every ratio."""
        return {
            "teacher_nll": self.teacher_nll,
            "teacher_nll_ratio": 1.0,
            "repeated_4grams": self.teacher_repeats,
            "answer_tokens": self.teacher_answer_tokens,
            "prompts": len(self.prompts),
        }

    def not_measured(self) -> dict[str, Any]:
        nan = float("nan")
        return {
            "teacher_nll": nan,
            "teacher_nll_ratio": nan,
            "repeated_4grams": nan,
            "answer_tokens": 0,
        }

    def describe(self) -> dict[str, Any]:
        return {
            "description": self.description,
            "rows": len(self.prompts),
            "teacher_nll": self.teacher_nll,
        }
