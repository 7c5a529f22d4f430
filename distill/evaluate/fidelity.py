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
* ``general``: the same for ``eval.general_prompts`` questions the teacher wrote itself
  (:func:`distill.teacher_text.general_questions`): plain requests on any topic, the way an
  instruct teacher is used beyond the corpus. Left out for a tokenizer without a chat
  template (it has no user turn).

The teacher's log-probabilities on the scored sets are computed once, during the build, and
kept on the CPU in fp32 at the scored positions only (``positions * vocab * 4`` bytes: 32
completions of 96 tokens over SmolLM2's 49,152 tokens are 0.6 GB; each extra corpus of 16
blocks of 256 tokens 0.8 GB). The teacher itself is kept loaded while an answer set
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
from distill.evaluate.answers import (
    AnswerSet,
    TeacherJudge,
    pad_samples,
    repeated_ngram_share,
)
from distill.evaluate.draft import draft_fields, gguf_matches, torch_matches
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
from distill.prompts import (
    GENERATION_SEED,
    TEACHER_TEXT_SEED,
    Prompt,
    has_chat_template,
    make_prompts,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from distill.models import LlamaRuntime, Teacher

log = logging.getLogger(__name__)

TEACHER_TEXT = "teacher_text"
GENERATION = "generation"
GENERAL = "general"
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
class FidelityInputs:
    """What the sets are made from, gathered before any model loads (so a bad extra corpus
    fails before the teacher's pass): the prompts and the extra corpora's blocks."""

    teacher_text: list[Prompt]
    generation: list[Prompt]
    extra: list[tuple[ExtraCorpus, torch.Tensor]]
    # Questions the general set asks (the teacher writes them once it is loaded); 0: none.
    general: int = 0


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
        general=ev.general_prompts if GENERAL in wanted and _asks(tokenizer) else 0,
    )


def _asks(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the teacher can write the general set's questions (it has a user turn)."""
    if has_chat_template(tokenizer):
        return True
    log.info("fidelity: the general set is left out: the tokenizer has no chat template")
    return False


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


def _by_length(answers: Sequence[AnswerSet]) -> dict[int, list[AnswerSet]]:
    """Answer sets grouped by their answer length, in order (one generate call per group)."""
    groups: dict[int, list[AnswerSet]] = {}
    for a in answers:
        groups.setdefault(a.max_new_tokens, []).append(a)
    return groups


def longest_row(fidelity: Fidelity | None) -> int:
    """Tokens of the longest sequence a variant runs on these sets (the context a GGUF file
    is opened with): a scored row, or a prompt and its longest answer."""
    if fidelity is None:
        return 0
    lengths = [s.tokens.shape[1] for s in fidelity.sets]
    lengths += [max(len(p) for p in a.prompts) + a.max_new_tokens for a in fidelity.answers]
    return max(lengths, default=0)


def set_fields(sums: ScoreSums) -> dict[str, Any]:
    """One scored set's figures in a report row's ``fidelity`` dict."""
    return quality_fields(sums)


@dataclass
class Fidelity:
    """The built sets and what scoring a variant on them needs (the teacher for answers)."""

    sets: list[ScoredSet]
    # Each with the teacher reading every variant's answers.
    answers: list[AnswerSet]
    vocab_size: int
    stop: list[int]
    batch_size: int
    generation_batch_size: int
    teacher_row: dict[str, Any] = field(default_factory=dict)

    def score_model(self, name: str, model: PreTrainedModel) -> dict[str, Any]:
        """A torch variant's ``fidelity`` dict: every set, keyed by set name."""
        from distill.sampling import generate

        out = {
            s.name: set_fields(
                score_blocks(model, s.tokens, self.batch_size, s.reference, mask=s.mask)
            )
            for s in self.sets
        }
        # Every set's prompts in one generate call: a batch-1 or small-batch decode step
        # costs about as much as a step twice as wide on CPU (it reads every weight either
        # way; an eager int8 row also converts every weight each step), so two sets of 16
        # answered as one batch of 32 take a little over half the time.
        for length, sets in _by_length(self.answers).items():
            prompts = [p for a in sets for p in a.prompts]
            answers = generate(
                model,
                prompts,
                max_new_tokens=length,
                temperature=0.0,
                seed=0,
                batch_size=self.generation_batch_size,
                desc=f"answers {name}",
            )
            for a in sets:
                out[a.name] = a.fields(answers[: len(a.prompts)])
                answers = answers[len(a.prompts) :]
        for a in self.answers:  # as the teacher's draft model, on the teacher's own answers
            matches = torch_matches(model, a.prompts, a.teacher_answers, self.batch_size)
            out[a.name]["draft"] = draft_fields(matches)
        return out

    def score_gguf(self, name: str, runtime: LlamaRuntime) -> dict[str, Any]:
        """A GGUF file's ``fidelity`` dict, scored and answered in llama.cpp.

        Raises:
            LlamaCppError: llama.cpp cannot run the file.
        """
        out = {s.name: set_fields(score_set_gguf(runtime, s, self.batch_size)) for s in self.sets}
        for length, sets in _by_length(self.answers).items():
            prompts = [p for a in sets for p in a.prompts]
            answers = runtime.generate(
                prompts, length, self.stop, vocab_size=self.vocab_size, desc=f"answers {name}"
            )
            for a in sets:
                out[a.name] = a.fields(answers[: len(a.prompts)])
                answers = answers[len(a.prompts) :]
        for a in self.answers:
            matches = gguf_matches(runtime, a.prompts, a.teacher_answers, self.vocab_size)
            out[a.name]["draft"] = draft_fields(matches)
        return out

    def not_measured(self) -> dict[str, Any]:
        """The ``fidelity`` dict of a row nothing could be scored for (NaN, as ScoreSums)."""
        out = {s.name: set_fields(ScoreSums()) for s in self.sets}
        return out | {a.name: a.not_measured() for a in self.answers}

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
        return out | {a.name: a.describe() for a in self.answers}

    def release(self) -> None:
        """Drop the references and the teacher's prompt caches once every row is scored."""
        self.sets.clear()
        for a in self.answers:
            a.judge = None


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


def _answer_set(
    name: str, prompts: Sequence[Prompt], what: str, cfg: PipelineConfig, teacher: Teacher
) -> AnswerSet:
    """``prompts`` (``what`` they are) as an answer set: the teacher's greedy answers and its
    NLL of them, each computed once and cached."""
    from distill.caches import cache_root
    from distill.data import tokenizer_fingerprint
    from distill.teacher_text import teacher_samples

    ev = cfg.eval
    own = teacher_samples(
        teacher.model,
        tokenizer_fingerprint(teacher.tokenizer),
        prompts,
        teacher_weights=teacher.weights_key,
        max_new_tokens=ev.generation_tokens,
        temperature=0.0,
        seed=0,
        # The batches it is answered in (the cache's key): one set never spans two.
        batch_size=min(ev.generation_batch_size, len(prompts)),
        cache_dir=cache_root(cfg),
        what=f"fidelity: the teacher's greedy answers ({name})",
    )
    tokens = [p.tokens for p in prompts]
    judge = TeacherJudge(teacher.model, tokens)
    answers = [s.completion for s in own.samples]

    def score_own() -> dict[str, Any]:
        nll, count = judge.nll(answers)
        return {"nll": nll, "tokens": count, "repeats": repeated_ngram_share(answers)}

    # The teacher's NLL of its own answers depends only on what the cache already holds:
    # scored once, kept beside the answers (named by how it was scored).
    own_figures = own.figures("teacher-nll-prompt-cache", score_own)
    nll = own_figures["nll"]
    return AnswerSet(
        name,
        tokens,
        ev.generation_tokens,
        f"the teacher's mean NLL per token of each variant's greedy answers (up to "
        f"{ev.generation_tokens} tokens) to {len(tokens)} {what}, and its ratio to the "
        f"teacher's NLL of its own greedy answers ({nll:.3f} nats); repeats = the share of an "
        "answer's 4-grams it already wrote (a loop is easy to predict, so it flatters the NLL)",
        judge,
        teacher_nll=nll,
        teacher_answer_tokens=int(own_figures["tokens"]),
        teacher_repeats=own_figures["repeats"],
        teacher_answers=[tuple(a) for a in answers],
    )


def _answer_sets(inputs: FidelityInputs, cfg: PipelineConfig, teacher: Teacher) -> list[AnswerSet]:
    from distill.teacher_text import general_questions, own_prompts

    out = []
    if inputs.generation:
        chat = any(p.kind == "chat" for p in inputs.generation)
        what = f"held-out {'chat' if chat else 'continuation'} prompts"
        out.append(_answer_set(GENERATION, inputs.generation, what, cfg, teacher))
    if inputs.general:
        questions = general_questions(cfg, teacher.model, teacher.tokenizer, teacher.weights_key)
        prompts = own_prompts(teacher.tokenizer, questions, 0)
        if prompts:
            what = "general questions the teacher wrote itself (never trained on)"
            out.append(_answer_set(GENERAL, prompts, what, cfg, teacher))
    return out


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
    answers = _answer_sets(inputs, cfg, teacher)
    row |= {a.name: a.teacher_fields() for a in answers}
    return Fidelity(
        sets=sets,
        answers=answers,
        vocab_size=int(model.get_output_embeddings().weight.shape[0]),
        stop=stop_ids(model),
        batch_size=ev.batch_size,
        generation_batch_size=ev.generation_batch_size,
        teacher_row=row,
    )
