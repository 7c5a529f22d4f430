"""Fidelity to the teacher beyond the held-out blocks: sets built once, scored for every variant.

The held-out blocks say how well a variant predicts the corpus. What a student is *for* is to
stand in for its teacher, so every variant is also scored on (``eval.fidelity``,
``eval.extra_corpora``):

* ``teacher_text``: the teacher's own text, sampled at ``eval.teacher_text_temperature`` after
  ``eval.teacher_text_prompts`` prompts drawn from the *validation* documents (half of them
  chat turns through the tokenizer's chat template, when it has one), generated once and
  cached with a manifest (:func:`distill.generation.teacher_samples`). Only the completion
  tokens are scored (prompt and padding masked): perplexity, KL(teacher || variant), top-1
  agreement, as :mod:`distill.evaluate.metrics` defines them. Never trained on.
* ``extra:<name>``: the first ``eval.extra_corpus_blocks`` blocks of ``data.block_size``
  tokens of each extra corpus, scored like the held-out blocks.
* ``generation``: each variant answers ``eval.generation_prompts`` held-out prompts greedily
  (chat turns when there is a chat template, continuations otherwise), and the teacher scores
  the answer tokens given the prompt: ``teacher_nll`` is its mean per-token NLL (how likely
  the teacher finds what the variant writes), ``teacher_nll_ratio`` that over the teacher's
  NLL of its own greedy answers (1 for the teacher; cached like the teacher text).

The teacher's log-probabilities on the scored sets are computed once, during the build, and
kept on the CPU in fp32 at the scored positions only (``positions * vocab * 4`` bytes: 32
completions of 96 tokens over SmolLM2's 49,152 tokens are 0.6 GB; each extra corpus of 16
blocks of 256 tokens 0.8 GB). The teacher itself is kept loaded while the ``generation`` set
is on, to score every variant's answers. GGUF rows get the same sets through llama.cpp: its
logits for the scored sets, its own greedy decoding for the answers.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from distill.config import (
    DataConfig,
    DistillError,
    EvalConfig,
    ExtraCorpus,
    PipelineConfig,
    cache_root,
)
from distill.evaluate.metrics import (
    ScoreSums,
    batches_of,
    quality_fields,
    score_blocks,
    score_positions,
    target_mask,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from distill.generation import Prompt, Sample

log = logging.getLogger(__name__)

TEACHER_TEXT = "teacher_text"
GENERATION = "generation"
EXTRA = "extra:"
# Prompt seeds: fixed offsets from data.split_seed, so the evaluation's prompts are drawn in
# their own order, never the one a training prompt set uses (and from validation documents).
TEACHER_TEXT_SEED_OFFSET = 1_000_003
GENERATION_SEED_OFFSET = 2_000_003
# A chat teacher's teacher text: half continuations, half answers through its chat template.
TEACHER_TEXT_CHAT_SHARE = 0.5


class FidelityError(DistillError):
    """A fidelity set cannot be built from what the config names."""


# --------------------------------------------------------------------------------------------
# The sets
# --------------------------------------------------------------------------------------------


@dataclass
class ScoredSet:
    """Rows scored like the held-out blocks against the teacher's log-probs.

    ``tokens`` ``(N, T)`` are packed blocks (``mask`` None) or prompts with what was written
    after them, right-padded, ``mask`` ``(N, T)`` marking the completion tokens scored.
    ``reference`` is the teacher's fp32 log-probs per batch of ``batch_size`` rows, on the
    CPU, as :func:`distill.evaluate.metrics.score_blocks` takes them.
    """

    name: str
    tokens: torch.Tensor
    mask: torch.Tensor | None
    description: str
    reference: list[torch.Tensor] = field(default_factory=list)


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


def pad_samples(samples: Sequence[Sample], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt + completion of each sample as right-padded rows ``(N, T)`` and the mask ``(N,
    T)`` of the completion tokens: what :func:`score_blocks` scores with ``mask``.

    Right padding sits after every scored position, so causal attention never sees it.
    """
    width = max(len(s.prompt) + len(s.completion) for s in samples)
    tokens = torch.full((len(samples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for r, s in enumerate(samples):
        row = list(s.prompt) + list(s.completion)
        tokens[r, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[r, len(s.prompt) : len(row)] = 1
    return tokens, mask


def val_documents(cfg: PipelineConfig) -> list[Any]:
    """The held-out documents of ``cfg.data`` (never trained on): the prompts' source."""
    from distill.data import load_documents, split_documents

    docs = load_documents(cfg.data)
    return split_documents(docs, cfg.data.val_fraction, cfg.data.split_seed)[1]


def check_extra_corpora(ev: EvalConfig) -> None:
    """Cheap check before any model loads: every file entry of ``eval.extra_corpora`` names
    at least one file (``datasets`` names are only resolved when read).

    Raises:
        FidelityError: naming the entry that matches no file.
    """
    from distill.data import DataError, expand_paths

    for corpus in map(ExtraCorpus.parse, ev.extra_corpora):
        if corpus.source == "text_files":
            try:
                expand_paths([corpus.path])
            except DataError:
                raise FidelityError(
                    f"eval.extra_corpora entry {corpus.entry!r} matches no file: check the path "
                    "or glob (or write hf:<dataset> for a datasets name)"
                ) from None


def extra_blocks(
    corpus: ExtraCorpus, cfg: PipelineConfig, tokenizer: PreTrainedTokenizerBase
) -> torch.Tensor:
    """The first ``eval.extra_corpus_blocks`` blocks ``(n, data.block_size)`` of ``corpus``,
    read by the corpus loaders of :mod:`distill.data`.

    Raises:
        FidelityError: naming the entry, when it cannot be read or fills no block.
    """
    from distill.data import DataError, load_documents, pack_documents

    column = corpus.text_column or cfg.data.text_column
    if corpus.source == "hf":
        data = DataConfig(
            source="hf",
            path=corpus.path,
            name=corpus.config,
            split=corpus.split,
            text_column=column,
        )
    else:
        data = DataConfig(source="text_files", paths=[corpus.path], text_column=column)
    try:
        docs = load_documents(data)
    except DataError as err:
        raise FidelityError(f"eval.extra_corpora entry {corpus.entry!r}: {err}") from None
    blocks = pack_documents(docs, tokenizer, cfg.data.block_size)[: cfg.eval.extra_corpus_blocks]
    if blocks.shape[0] == 0:
        raise FidelityError(
            f"eval.extra_corpora entry {corpus.entry!r} holds fewer tokens than one block of "
            f"data.block_size={cfg.data.block_size}: add text or drop the entry"
        )
    return blocks


def fidelity_inputs(
    cfg: PipelineConfig, tokenizer: PreTrainedTokenizerBase
) -> FidelityInputs | None:
    """The prompts (from the validation documents) and extra corpora the config asks for, or
    None when every fidelity set is off.

    Raises:
        FidelityError: an extra corpus is missing or too short.
        DataError: the corpus cannot be read (as the data stage would say).
    """
    from distill.generation import make_prompts

    ev = cfg.eval
    wanted = set(ev.fidelity)
    extra = [(c, extra_blocks(c, cfg, tokenizer)) for c in map(ExtraCorpus.parse, ev.extra_corpora)]
    if not wanted and not extra:
        return None
    docs = val_documents(cfg) if wanted else []

    def prompts(n: int, chat_share: float, offset: int) -> list[Prompt]:
        seed = cfg.data.split_seed + offset
        return make_prompts(
            docs,
            tokenizer,
            n,
            chat_share=chat_share,
            prompt_tokens=ev.fidelity_prompt_tokens,
            seed=seed,
        )

    return FidelityInputs(
        teacher_text=(
            prompts(ev.teacher_text_prompts, TEACHER_TEXT_CHAT_SHARE, TEACHER_TEXT_SEED_OFFSET)
            if TEACHER_TEXT in wanted
            else []
        ),
        generation=(
            prompts(ev.generation_prompts, 1.0, GENERATION_SEED_OFFSET)
            if GENERATION in wanted
            else []
        ),
        extra=extra,
    )


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------


def _rows(scored: ScoredSet, batch_size: int) -> Iterator[tuple[list[int], torch.Tensor, Any]]:
    """Per row of ``scored``: its tokens up to its last target, which of its predicting
    positions are scored ``(L - 1,)`` bool, and the teacher's log-probs there ``(n, V)``."""
    masks = batches_of(scored.mask, batch_size) if scored.mask is not None else None
    for i, (batch, ref) in enumerate(
        zip(batches_of(scored.tokens, batch_size), scored.reference, strict=True)
    ):
        if masks is None:
            for r in range(batch.shape[0]):
                keep = torch.ones(batch.shape[1] - 1, dtype=torch.bool)
                yield batch[r].tolist(), keep, ref[r, :-1]
            continue
        keeps = target_mask(masks[i])
        for r, part in enumerate(ref.split(keeps.sum(1).tolist())):
            last = int(keeps[r].nonzero().max()) + 2  # the last target, included
            yield batch[r, :last].tolist(), keeps[r, : last - 1], part


def score_set_gguf(path: Path, scored: ScoredSet, batch_size: int, threads: int) -> ScoreSums:
    """:class:`ScoredSet` quality of a GGUF file from llama.cpp's logits, positions masked as
    the torch rows' are (:func:`distill.evaluate.metrics.score_positions`).

    Raises:
        LlamaCppError: llama.cpp cannot load or run the file.
    """
    from distill.models.llama_cpp import iter_gguf_logits

    rows = list(_rows(scored, batch_size))
    vocab = rows[0][2].shape[-1]
    logits = iter_gguf_logits(path, [r[0] for r in rows], threads, vocab_size=vocab)
    total = ScoreSums()
    for (tokens, keep, ref), row_logits in zip(rows, logits, strict=True):
        log_probs = F.log_softmax(row_logits[:-1], dim=-1)[keep]
        targets = torch.tensor(tokens[1:], dtype=torch.long)[keep]
        total = total + score_positions(log_probs, ref, targets)
    return total


def generation_samples(
    prompts: Sequence[tuple[int, ...]], answers: Sequence[tuple[int, ...]]
) -> list[Sample]:
    from distill.generation import Sample

    return [Sample("answer", "", p, a) for p, a in zip(prompts, answers, strict=True)]


def answers_nll(
    teacher: PreTrainedModel,
    prompts: Sequence[tuple[int, ...]],
    answers: Sequence[tuple[int, ...]],
    batch_size: int,
) -> tuple[float, int]:
    """The teacher's mean per-token NLL (nats) of ``answers`` given their ``prompts``, and
    the answer tokens scored: the CE of :func:`score_blocks` with the prompts masked."""
    tokens, mask = pad_samples(generation_samples(prompts, answers))
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


def set_fields(sums: ScoreSums) -> dict[str, Any]:
    """One scored set's figures in a report row's ``fidelity`` dict."""
    return quality_fields(sums)


@dataclass
class Fidelity:
    """The built sets and what scoring a variant on them needs (the teacher for answers)."""

    sets: list[ScoredSet]
    generation: GenerationSet | None
    teacher: Any
    stop: list[int]
    batch_size: int
    generation_batch_size: int
    teacher_row: dict[str, Any] = field(default_factory=dict)

    def _generation_fields(self, answers: Sequence[tuple[int, ...]]) -> dict[str, Any]:
        assert self.generation is not None
        nll, count = answers_nll(
            self.teacher, self.generation.prompts, answers, self.generation_batch_size
        )
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
        from distill.generation import generate

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

    def score_gguf(self, name: str, path: Path, threads: int) -> dict[str, Any]:
        """A GGUF file's ``fidelity`` dict, scored and answered in llama.cpp.

        Raises:
            LlamaCppError: llama.cpp cannot load or run the file.
        """
        from distill.models.llama_cpp import gguf_generate

        out = {
            s.name: set_fields(score_set_gguf(path, s, self.batch_size, threads)) for s in self.sets
        }
        if self.generation is not None:
            vocab = self.teacher.get_output_embeddings().weight.shape[0]
            answers = gguf_generate(
                path,
                self.generation.prompts,
                self.generation.max_new_tokens,
                self.stop,
                threads,
                vocab_size=vocab,
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
            scored = int(target_mask(s.mask).sum()) if s.mask is not None else None
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
        """Drop the references and the teacher once every row is scored."""
        self.sets.clear()
        self.teacher = None


# --------------------------------------------------------------------------------------------
# Building the sets with the teacher
# --------------------------------------------------------------------------------------------


def _reference(
    teacher: PreTrainedModel, scored: ScoredSet, batch_size: int, label: str
) -> ScoreSums:
    """The teacher's pass over ``scored``: its log-probs kept (CPU) as the set's reference,
    and its own figures (KL 0, top-1 1 by construction)."""
    with torch.inference_mode():
        return score_blocks(
            teacher,
            scored.tokens,
            batch_size,
            None,
            mask=scored.mask,
            on_log_probs=lambda lp: scored.reference.append(lp.cpu()),
            desc=label,
        )


def _teacher_text(
    inputs: FidelityInputs, cfg: PipelineConfig, teacher: Any, tokenizer: Any, weights: str
) -> ScoredSet:
    from distill.generation import teacher_samples

    ev = cfg.eval
    samples = teacher_samples(
        teacher,
        tokenizer,
        inputs.teacher_text,
        max_new_tokens=ev.teacher_text_tokens,
        temperature=ev.teacher_text_temperature,
        seed=cfg.data.split_seed,
        batch_size=ev.generation_batch_size,
        cache_dir=cache_root(cfg),
        folder=ev.teacher_text_dir,
        what="fidelity: teacher text",
        teacher_weights=weights,
    )
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
    inputs: FidelityInputs, cfg: PipelineConfig, teacher: Any, tokenizer: Any, weights: str
) -> GenerationSet:
    from distill.generation import teacher_samples

    ev = cfg.eval
    own = teacher_samples(
        teacher,
        tokenizer,
        inputs.generation,
        max_new_tokens=ev.generation_tokens,
        temperature=0.0,
        seed=0,
        batch_size=ev.generation_batch_size,
        cache_dir=cache_root(cfg),
        what="fidelity: the teacher's greedy answers",
        teacher_weights=weights,
    )
    prompts = [p.tokens for p in inputs.generation]
    kind = "chat" if any(p.kind == "chat" for p in inputs.generation) else "continuation"
    nll, count = answers_nll(
        teacher, prompts, [s.completion for s in own], ev.generation_batch_size
    )
    return GenerationSet(
        prompts,
        ev.generation_tokens,
        f"the teacher's mean NLL per token of each variant's greedy answers (up to "
        f"{ev.generation_tokens} tokens) to {len(prompts)} held-out {kind} prompts, and its "
        f"ratio to the teacher's NLL of its own greedy answers ({nll:.3f} nats); repeats = "
        "the share of an answer's 4-grams it already wrote (a loop is easy to predict, so "
        "it flatters the NLL)",
        teacher_nll=nll,
        teacher_answer_tokens=count,
        teacher_repeats=repeated_ngram_share([s.completion for s in own]),
    )


def build_fidelity(
    inputs: FidelityInputs,
    cfg: PipelineConfig,
    teacher: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
) -> Fidelity:
    """Generate (or read from the cache) the teacher's text and answers, keep the teacher's
    reference log-probs of every scored set, and fill in the teacher's own row.

    Raises:
        GenerationCacheMismatch: ``eval.teacher_text_dir`` holds another teacher's text.
    """
    from distill.generation import stop_ids

    ev = cfg.eval
    from distill.models.footprint import weights_hash

    # Both sets' caches are keyed by the teacher's weights: hash them once.
    weights = weights_hash(teacher) if inputs.teacher_text or inputs.generation else ""
    sets = [_teacher_text(inputs, cfg, teacher, tokenizer, weights)] if inputs.teacher_text else []
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
        s.name: set_fields(_reference(teacher, s, ev.batch_size, f"teacher {s.name}")) for s in sets
    }
    generation = (
        _generation(inputs, cfg, teacher, tokenizer, weights) if inputs.generation else None
    )
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
        # Kept only to score answers: a run without the generation set frees it as before.
        teacher=teacher if generation is not None else None,
        stop=stop_ids(teacher),
        batch_size=ev.batch_size,
        generation_batch_size=ev.generation_batch_size,
        teacher_row=row,
    )
