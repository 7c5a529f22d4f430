"""Fidelity to the teacher beyond the held-out blocks: sets built once, scored for every variant.

The held-out blocks say how well a variant predicts the corpus. What a student is *for* is to
stand in for its teacher, so every variant is also scored on (``eval.fidelity``,
``eval.extra_corpora``):

* ``teacher_text``: the teacher's own text, sampled at ``eval.teacher_text_temperature`` after
  ``eval.teacher_text_prompts`` prompts drawn from the *validation* documents (half of them
  chat turns through the tokenizer's chat template, when it has one), generated once and
  cached (:func:`distill.teacher_text.teacher_samples`). Only the completion tokens are
  scored (prompt and padding masked): perplexity, KL(teacher || variant), top-1 agreement, as
  :mod:`distill.metrics` defines them. Never trained on.
* ``extra:<name>``: the first ``eval.extra_corpus_blocks`` blocks of ``data.block_size``
  tokens of each extra corpus (:mod:`distill.evaluate.extra_corpora`), scored like the
  held-out blocks.
* ``generation``: each variant answers ``eval.generation_prompts`` held-out prompts greedily
  (chat turns when there is a chat template, continuations otherwise), and the teacher scores
  the answer tokens given the prompt: ``teacher_nll`` is its mean per-token NLL (how likely
  the teacher finds what the variant writes), ``teacher_nll_ratio`` that over the teacher's
  NLL of its own greedy answers (1 for the teacher). The teacher's answers and its NLL of
  them are computed once and cached together.

The teacher's log-probabilities on the scored sets are computed once, during the build, and
kept on the CPU in fp32 at the scored positions only (``positions * vocab * 4`` bytes: 32
completions of 96 tokens over SmolLM2's 49,152 tokens are 0.6 GB; each extra corpus of 16
blocks of 256 tokens 0.8 GB). The teacher itself is kept loaded while the ``generation`` set
is on, to score every variant's answers. GGUF rows get the same sets through llama.cpp
(:meth:`Fidelity.score_gguf`): its logits for the scored sets, its own greedy decoding for
the answers, in the file opened once for the row.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from distill.config import PipelineConfig
from distill.evaluate.answers import TeacherJudge, pad_samples, repeated_ngram_share
from distill.evaluate.extra_corpora import extra_blocks
from distill.extra_corpus import ExtraCorpus
from distill.metrics import (
    ScoreSums,
    TeacherSide,
    batches_of,
    quality_fields,
    score_blocks,
    score_positions,
)
from distill.metrics import target_mask as scored_mask
from distill.prompts import GENERATION_SEED, TEACHER_TEXT_SEED, Prompt, make_prompts

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from distill.models import LlamaRuntime, Teacher

log = logging.getLogger(__name__)

TEACHER_TEXT = "teacher_text"
GENERATION = "generation"
EXTRA = "extra:"
# A chat teacher's teacher text: half continuations, half answers through its chat template.
TEACHER_TEXT_CHAT_SHARE = 0.5


# --------------------------------------------------------------------------------------------
# The sets
# --------------------------------------------------------------------------------------------


@dataclass
class ScoredSet:
    """Rows scored like the held-out blocks against the teacher's log-probs.

    ``tokens`` ``(N, T)`` are packed blocks (``mask`` None) or prompts with what was written
    after them, right-padded, ``mask`` ``(N, T)`` marking the completion tokens scored.
    ``reference`` is the teacher per batch of ``batch_size`` rows at their scored positions,
    on the CPU, as :func:`distill.metrics.score_blocks` takes it.
    """

    name: str
    tokens: torch.Tensor
    mask: torch.Tensor | None
    description: str
    reference: list[TeacherSide] = field(default_factory=list)


@dataclass
class GenerationSet:
    """Held-out prompts each variant answers greedily, and the teacher's NLL of its own."""

    prompts: list[tuple[int, ...]]
    max_new_tokens: int
    description: str
    teacher_nll: float = float("nan")
    teacher_answer_tokens: int = 0
    teacher_repeats: float = float("nan")


@dataclass
class FidelityInputs:
    """What the sets are made from, gathered before any model loads (so a bad extra corpus
    fails before the teacher's pass): the prompts and the extra corpora's blocks."""

    teacher_text: list[Prompt]
    generation: list[Prompt]
    extra: list[tuple[ExtraCorpus, torch.Tensor]]


def val_documents(cfg: PipelineConfig) -> list[Any]:
    """The held-out documents of ``cfg.data`` (never trained on): the prompts' source."""
    from distill.data import load_documents, split_documents

    docs = load_documents(cfg.data)
    return split_documents(docs, cfg.data.val_fraction, cfg.data.split_seed)[1]


def fidelity_inputs(
    cfg: PipelineConfig, tokenizer: PreTrainedTokenizerBase
) -> FidelityInputs | None:
    """The prompts (from the *validation* documents) and extra corpora the config asks for,
    or None when every fidelity set is off.

    Raises:
        FidelityError: an extra corpus is missing or too short.
        DataError: the corpus cannot be read (as the data stage would say).
    """
    ev = cfg.eval
    wanted = set(ev.fidelity)
    extra = [(c, extra_blocks(c, cfg, tokenizer)) for c in map(ExtraCorpus.parse, ev.extra_corpora)]
    if not wanted and not extra:
        return None
    docs = val_documents(cfg) if wanted else []

    def prompts(n: int, chat_share: float, offset: int) -> list[Prompt]:
        return make_prompts(
            docs,
            tokenizer,
            n,
            chat_share=chat_share,
            prompt_tokens=ev.fidelity_prompt_tokens,
            seed=cfg.data.split_seed + offset,
        )

    return FidelityInputs(
        teacher_text=(
            prompts(ev.teacher_text_prompts, TEACHER_TEXT_CHAT_SHARE, TEACHER_TEXT_SEED)
            if TEACHER_TEXT in wanted
            else []
        ),
        generation=(
            prompts(ev.generation_prompts, 1.0, GENERATION_SEED) if GENERATION in wanted else []
        ),
        extra=extra,
    )


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------


def _rows(scored: ScoredSet, batch_size: int) -> Iterator[tuple[list[int], torch.Tensor, Any]]:
    """Per row of ``scored``: its tokens up to its last target, which of its predicting
    positions are scored ``(L - 1,)`` bool, and the teacher there (a :class:`TeacherSide`)."""
    masks = batches_of(scored.mask, batch_size) if scored.mask is not None else None
    for i, (batch, ref) in enumerate(
        zip(batches_of(scored.tokens, batch_size), scored.reference, strict=True)
    ):
        if masks is None:
            keep = torch.ones(batch.shape[1] - 1, dtype=torch.bool)
            for r, part in enumerate(ref.split([batch.shape[1] - 1] * batch.shape[0])):
                yield batch[r].tolist(), keep, part
            continue
        keeps = scored_mask(masks[i])
        for r, part in enumerate(ref.split(keeps.sum(1).tolist())):
            last = int(keeps[r].nonzero().max()) + 2  # the last target, included
            yield batch[r, :last].tolist(), keeps[r, : last - 1], part


def score_set_gguf(runtime: LlamaRuntime, scored: ScoredSet, batch_size: int) -> ScoreSums:
    """:class:`ScoredSet` quality of a GGUF file from llama.cpp's logits, positions masked as
    the torch rows' are (:func:`distill.metrics.score_positions`). A row whose scored
    positions are a completion after its prompt gets logits at those positions only
    (:meth:`~distill.models.LlamaRuntime.completion_logits`).

    Raises:
        LlamaCppError: llama.cpp cannot run the file.
    """
    total = ScoreSums()
    for tokens, keep, ref in _rows(scored, batch_size):
        vocab = ref.vocab_size
        targets = torch.tensor(tokens[1:], dtype=torch.long)[keep]
        start = int(keep.nonzero()[0]) if keep.any() else 0
        if keep[start:].all() and start > 0:  # a completion: tokens[start + 1:]
            logits = runtime.completion_logits(tokens[: start + 1], tokens[start + 1 :], vocab)
            log_probs = F.log_softmax(logits, dim=-1)
        else:
            (logits,) = runtime.iter_logits([tokens], vocab)
            log_probs = F.log_softmax(logits[:-1], dim=-1)[keep]
        total = total + score_positions(log_probs, ref, targets)
    return total


def longest_row(fidelity: Fidelity | None) -> int:
    """Tokens of the longest sequence a variant runs on these sets (the context a GGUF file
    is opened with): a scored row, or a prompt and its longest answer."""
    if fidelity is None:
        return 0
    lengths = [s.tokens.shape[1] for s in fidelity.sets]
    if fidelity.generation is not None:
        gen = fidelity.generation
        lengths += [max(len(p) for p in gen.prompts) + gen.max_new_tokens]
    return max(lengths, default=0)


def set_fields(sums: ScoreSums) -> dict[str, Any]:
    """One scored set's figures in a report row's ``fidelity`` dict."""
    return quality_fields(sums)


@dataclass
class Fidelity:
    """The built sets and what scoring a variant on them needs (the teacher for answers)."""

    sets: list[ScoredSet]
    generation: GenerationSet | None
    # The teacher reading every variant's answers (None without the generation set).
    judge: TeacherJudge | None
    vocab_size: int
    stop: list[int]
    batch_size: int
    generation_batch_size: int
    teacher_row: dict[str, Any] = field(default_factory=dict)

    def _generation_fields(self, answers: Sequence[tuple[int, ...]]) -> dict[str, Any]:
        assert self.generation is not None and self.judge is not None
        nll, count = self.judge.nll(answers)
        ratio = nll / self.generation.teacher_nll if self.generation.teacher_nll else None
        return {
            "teacher_nll": nll,
            "teacher_nll_ratio": ratio,
            "repeated_4grams": repeated_ngram_share(answers),
            "answer_tokens": count,
            "prompts": len(answers),
        }

    def score_model(self, name: str, model: PreTrainedModel) -> dict[str, Any]:
        """A torch variant's ``fidelity`` dict: every set, keyed by set name."""
        from distill.sampling import generate

        out = {
            s.name: set_fields(
                score_blocks(model, s.tokens, self.batch_size, s.reference, mask=s.mask)
            )
            for s in self.sets
        }
        if self.generation is not None:
            answers = generate(
                model,
                self.generation.prompts,
                max_new_tokens=self.generation.max_new_tokens,
                temperature=0.0,
                seed=0,
                batch_size=self.generation_batch_size,
                desc=f"answers {name}",
            )
            out[GENERATION] = self._generation_fields(answers)
        return out

    def score_gguf(self, name: str, runtime: LlamaRuntime) -> dict[str, Any]:
        """A GGUF file's ``fidelity`` dict, scored and answered in llama.cpp.

        Raises:
            LlamaCppError: llama.cpp cannot run the file.
        """
        out = {s.name: set_fields(score_set_gguf(runtime, s, self.batch_size)) for s in self.sets}
        if self.generation is not None:
            answers = runtime.generate(
                self.generation.prompts,
                self.generation.max_new_tokens,
                self.stop,
                vocab_size=self.vocab_size,
                desc=f"answers {name}",
            )
            out[GENERATION] = self._generation_fields(answers)
        return out

    def not_measured(self) -> dict[str, Any]:
        """The ``fidelity`` dict of a row nothing could be scored for (NaN, as ScoreSums)."""
        out = {s.name: set_fields(ScoreSums()) for s in self.sets}
        if self.generation is not None:
            nan = float("nan")
            out[GENERATION] = {
                "teacher_nll": nan,
                "teacher_nll_ratio": nan,
                "repeated_4grams": nan,
                "answer_tokens": 0,
            }
        return out

    def describe(self) -> dict[str, Any]:
        """``report.json``'s ``fidelity`` section: what each set is, by set name."""
        out: dict[str, Any] = {}
        for s in self.sets:
            scored = int(scored_mask(s.mask).sum()) if s.mask is not None else None
            out[s.name] = {
                "description": s.description,
                "rows": int(s.tokens.shape[0]),
                "scored_tokens": scored
                if scored is not None
                else int(s.tokens.shape[0] * (s.tokens.shape[1] - 1)),
            }
        if self.generation is not None:
            out[GENERATION] = {
                "description": self.generation.description,
                "rows": len(self.generation.prompts),
                "teacher_nll": self.generation.teacher_nll,
            }
        return out

    def release(self) -> None:
        """Drop the references and the teacher's prompt caches once every row is scored."""
        self.sets.clear()
        self.judge = None


# --------------------------------------------------------------------------------------------
# Building the sets with the teacher
# --------------------------------------------------------------------------------------------


def _reference(
    teacher: PreTrainedModel, scored: ScoredSet, batch_size: int, label: str
) -> ScoreSums:
    """The teacher's pass over ``scored``: kept (CPU) as the set's reference, and its own
    figures (KL 0, top-1 1 by construction)."""
    with torch.inference_mode():
        return score_blocks(
            teacher,
            scored.tokens,
            batch_size,
            None,
            mask=scored.mask,
            on_reference=lambda side: scored.reference.append(side.to("cpu")),
            desc=label,
        )


def _teacher_text(inputs: FidelityInputs, cfg: PipelineConfig, teacher: Teacher) -> ScoredSet:
    from distill.caches import cache_root
    from distill.data import tokenizer_fingerprint
    from distill.teacher_text import teacher_samples

    ev = cfg.eval
    samples = teacher_samples(
        teacher.model,
        tokenizer_fingerprint(teacher.tokenizer),
        inputs.teacher_text,
        teacher_weights=teacher.weights_key,
        max_new_tokens=ev.teacher_text_tokens,
        temperature=ev.teacher_text_temperature,
        seed=cfg.data.split_seed,
        batch_size=ev.teacher_text_batch_size,
        cache_dir=cache_root(cfg),
        folder=ev.teacher_text_dir,
        fix="eval.teacher_text_dir",
        what="fidelity: teacher text",
    ).samples
    tokens, mask = pad_samples(samples)
    chat = sum(s.kind == "chat" for s in samples)
    return ScoredSet(
        TEACHER_TEXT,
        tokens,
        mask,
        f"the teacher's own text: {len(samples)} completions of up to {ev.teacher_text_tokens} "
        f"tokens sampled at temperature {ev.teacher_text_temperature} after held-out prompts "
        f"({chat} chat turns, {len(samples) - chat} continuations), completion tokens scored",
    )


def _generation(
    inputs: FidelityInputs, cfg: PipelineConfig, teacher: Teacher, judge: TeacherJudge
) -> GenerationSet:
    from distill.caches import cache_root
    from distill.data import tokenizer_fingerprint
    from distill.teacher_text import teacher_samples

    ev = cfg.eval
    own = teacher_samples(
        teacher.model,
        tokenizer_fingerprint(teacher.tokenizer),
        inputs.generation,
        teacher_weights=teacher.weights_key,
        max_new_tokens=ev.generation_tokens,
        temperature=0.0,
        seed=0,
        batch_size=ev.generation_batch_size,
        cache_dir=cache_root(cfg),
        what="fidelity: the teacher's greedy answers",
    )
    prompts = [p.tokens for p in inputs.generation]
    answers = [s.completion for s in own.samples]

    def score_own() -> dict[str, Any]:
        nll, count = judge.nll(answers)
        return {"nll": nll, "tokens": count, "repeats": repeated_ngram_share(answers)}

    # The teacher's NLL of its own answers depends only on what the cache already holds:
    # scored once, kept beside the answers (named by how it was scored).
    own_figures = own.figures("teacher-nll-prompt-cache", score_own)
    nll = own_figures["nll"]
    kind = "chat" if any(p.kind == "chat" for p in inputs.generation) else "continuation"
    return GenerationSet(
        prompts,
        ev.generation_tokens,
        f"the teacher's mean NLL per token of each variant's greedy answers (up to "
        f"{ev.generation_tokens} tokens) to {len(prompts)} held-out {kind} prompts, and its "
        f"ratio to the teacher's NLL of its own greedy answers ({nll:.3f} nats); repeats = "
        "the share of an answer's 4-grams it already wrote (a loop is easy to predict, so "
        "it flatters the NLL)",
        teacher_nll=nll,
        teacher_answer_tokens=int(own_figures["tokens"]),
        teacher_repeats=own_figures["repeats"],
    )


def build_fidelity(inputs: FidelityInputs, cfg: PipelineConfig, teacher: Teacher) -> Fidelity:
    """Generate (or read from the cache) the teacher's text and answers, keep the teacher's
    reference log-probs of every scored set, and fill in the teacher's own row.

    Raises:
        CacheMismatchError: ``eval.teacher_text_dir`` holds another teacher's text.
    """
    from distill.sampling import stop_ids

    ev = cfg.eval
    model = teacher.model
    sets = [_teacher_text(inputs, cfg, teacher)] if inputs.teacher_text else []
    for corpus, blocks in inputs.extra:
        sets.append(
            ScoredSet(
                EXTRA + corpus.name,
                blocks,
                None,
                f"{corpus.entry}: its first {blocks.shape[0]} blocks of {blocks.shape[1]} "
                "tokens, scored like the held-out blocks",
            )
        )
    row = {
        s.name: set_fields(_reference(model, s, ev.batch_size, f"teacher {s.name}")) for s in sets
    }
    prompts = [p.tokens for p in inputs.generation]
    judge = TeacherJudge(model, prompts) if prompts else None
    generation = _generation(inputs, cfg, teacher, judge) if judge is not None else None
    if generation is not None:
        row[GENERATION] = {
            "teacher_nll": generation.teacher_nll,
            "teacher_nll_ratio": 1.0,
            "repeated_4grams": generation.teacher_repeats,
            "answer_tokens": generation.teacher_answer_tokens,
            "prompts": len(generation.prompts),
        }
    return Fidelity(
        sets=sets,
        generation=generation,
        judge=judge,
        vocab_size=int(model.get_output_embeddings().weight.shape[0]),
        stop=stop_ids(model),
        batch_size=ev.batch_size,
        generation_batch_size=ev.generation_batch_size,
        teacher_row=row,
    )
