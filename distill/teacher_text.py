"""The teacher's own text, generated once and cached: training text and evaluation sets.

Two parts of the pipeline need text the teacher writes after prompts: the training data
(``data.teacher_generated_fraction``, sequence-level KD; :func:`training_samples`) and the
evaluation's fidelity sets (the teacher's sampled text and its greedy answers;
:mod:`distill.evaluate.fidelity`). Both go through :func:`teacher_samples`, which keeps the
completions in a manifest-keyed cache folder (:mod:`distill.caches`) under
``cache_root/teacher_text/<key>/``: the manifest holds everything they depend on (teacher
weights, tokenizer, prompts, generation settings), so every run that shares them reuses them
and a folder made for anything else is refused by name. Figures computed from the samples
with the same teacher (its NLL of its own answers) are kept beside them
(:meth:`TeacherText.figures`), so they are computed once too.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from distill.caches import claim, is_complete, manifest_key, mark_complete
from distill.prompts import (
    GENERAL_SEED,
    OWN_TRAIN_SEED,
    TRAIN_PROMPT_SEED,
    Prompt,
    chat_tokens,
    has_chat_template,
    make_prompts,
    prompts_hash,
    usable_questions,
    user_prefix,
)
from distill.run_dir import write_json_atomic
from distill.sampling import generate, stop_ids

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from distill.config import DataConfig, PipelineConfig

log = logging.getLogger(__name__)

SAMPLES = "samples.json"
FORMAT_VERSION = 1
# What the cache folders are called in messages, and the settings that point elsewhere.
WHAT = "teacher-text cache"


@dataclass(frozen=True)
class Sample:
    """A prompt and the tokens a model wrote after it (EOS included when it stopped)."""

    kind: str
    source: str
    prompt: tuple[int, ...]
    completion: tuple[int, ...]


@dataclass(frozen=True)
class GenerationManifest:
    """Everything cached generations depend on; equal manifests share one folder."""

    teacher_weights: str
    tokenizer: str
    prompts: str
    num_prompts: int
    max_new_tokens: int
    temperature: float
    seed: int
    # Batch b samples under seed + b, and greedy tokens can turn on padding: the batch size
    # is part of what the text is.
    batch_size: int
    format: int = FORMAT_VERSION


@dataclass(frozen=True)
class TeacherText:
    """The teacher's completions of a prompt set, and the cache folder that holds them."""

    samples: list[Sample]
    folder: Path

    def figures(self, name: str, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """``compute()`` once, kept beside the samples as ``<name>.json`` and read back after.

        For figures of these samples that depend on nothing the manifest does not hold
        (e.g. the teacher's NLL of its own answers); ``name`` must say how they were
        computed where that could differ (a batch size changes float sums).
        """
        file = self.folder / f"{name}.json"
        if file.is_file():
            return json.loads(file.read_text())
        value = compute()
        write_json_atomic(file, value)
        return value


def _read_samples(path: Path) -> list[Sample]:
    rows = json.loads((path / SAMPLES).read_text())
    return [
        Sample(r["kind"], r["source"], tuple(r["prompt"]), tuple(r["completion"])) for r in rows
    ]


def teacher_samples(
    teacher: Any,
    tokenizer_key: str,
    prompts: Sequence[Prompt],
    *,
    teacher_weights: str,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    batch_size: int,
    cache_dir: Path,
    folder: str | Path | None = None,
    fix: str = "the folder setting",
    what: str = "teacher text",
) -> TeacherText:
    """The teacher's completions of ``prompts``, generated once and cached.

    Args:
        tokenizer_key: :func:`distill.data.tokenizer_fingerprint` of the teacher's tokenizer.
        teacher_weights: the teacher's weights hash, computed once per run by the caller.
        folder: the cache folder to use instead of ``cache_dir/teacher_text/<key>``.
        fix: the setting that names ``folder``, for the message when it is refused.

    A folder with a manifest is read when the manifest matches and refused otherwise. Every
    file is renamed into place whole; the completions are saved a few batches at a time
    (:func:`_generate_in_parts`), so an interrupted run resumes where it stopped, and
    ``COMPLETE`` marks the finished set.

    Raises:
        CacheMismatchError: ``folder`` holds generations for another teacher, prompt set or
            settings.
    """
    manifest = GenerationManifest(
        teacher_weights=teacher_weights,
        tokenizer=tokenizer_key,
        prompts=prompts_hash(prompts),
        num_prompts=len(prompts),
        max_new_tokens=max_new_tokens,
        temperature=float(temperature),
        seed=seed,
        batch_size=batch_size,
    )
    path = (
        Path(folder).expanduser() if folder else cache_dir / "teacher_text" / manifest_key(manifest)
    )
    claim(path, manifest, what=WHAT, fix=fix)
    if is_complete(path):
        return TeacherText(_read_samples(path), path)
    log.info(
        "%s: the teacher writes %d completion(s) of up to %d tokens (once; cached in %s)",
        what,
        len(prompts),
        max_new_tokens,
        path,
    )
    completions = _generate_in_parts(
        teacher, prompts, path / "parts", max_new_tokens, temperature, seed, batch_size, what
    )
    samples = [
        Sample(p.kind, p.source, p.tokens, c) for p, c in zip(prompts, completions, strict=True)
    ]
    write_json_atomic(path / SAMPLES, [asdict(s) for s in samples])
    mark_complete(path)
    for part in sorted((path / "parts").glob("*.json")):
        part.unlink()
    return TeacherText(samples, path)


# Batches per part file of an unfinished generation: an interrupted run loses at most these.
BATCHES_PER_PART = 2


def _generate_in_parts(
    teacher: Any,
    prompts: Sequence[Prompt],
    parts: Path,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    batch_size: int,
    what: str,
) -> list[tuple[int, ...]]:
    """:func:`~distill.sampling.generate` over ``prompts``, a few batches at a time, each part
    saved under ``parts`` as it finishes and read back on a rerun. Part ``i`` starts at batch
    ``b`` and is generated with seed ``seed + b``, which is exactly what one whole call gives
    batch ``b``, so a resumed generation equals an uninterrupted one."""
    parts.mkdir(parents=True, exist_ok=True)
    step = batch_size * BATCHES_PER_PART
    out: list[tuple[int, ...]] = []
    with tqdm(total=len(prompts), desc=what, unit="prompt", leave=False) as bar:
        for start in range(0, len(prompts), step):
            file = parts / f"{start:07d}.json"
            if file.exists():
                done = [tuple(c) for c in json.loads(file.read_text())]
            else:
                done = generate(
                    teacher,
                    [p.tokens for p in prompts[start : start + step]],
                    max_new_tokens=max_new_tokens,
                    temperature=temperature,
                    seed=seed + start // batch_size,
                    batch_size=batch_size,
                )
                write_json_atomic(file, [list(c) for c in done])
            out.extend(done)
            bar.update(len(done))
    return out


def own_share_count(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase) -> int:
    """How many training prompts are the teacher's own questions: ``data.generated_own_share``
    of them, none for a tokenizer without a chat template (said once in the log)."""
    if cfg.generated_own_share == 0.0:
        return 0
    if not has_chat_template(tokenizer):
        log.warning(
            "data.generated_own_share=%s is ignored: the teacher's tokenizer has no chat "
            "template, so it has no user turn to write",
            cfg.generated_own_share,
        )
        return 0
    return round(cfg.generated_prompts * cfg.generated_own_share)


def training_prompts(
    cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, num_prompts: int | None = None
) -> list[Prompt]:
    """The corpus prompts the teacher's training text answers (``num_prompts``, default
    ``data.generated_prompts``): drawn from the *training* documents only (the train/val
    split), under :data:`~distill.prompts.TRAIN_PROMPT_SEED`."""
    from distill.data import load_documents, split_documents

    train_docs, _ = split_documents(load_documents(cfg), cfg.val_fraction, cfg.split_seed)
    return make_prompts(
        train_docs,
        tokenizer,
        cfg.generated_prompts if num_prompts is None else num_prompts,
        chat_share=cfg.generated_chat_share,
        prompt_tokens=cfg.generated_prompt_tokens,
        seed=TRAIN_PROMPT_SEED + cfg.split_seed,
    )


def training_samples(
    cfg: DataConfig,
    teacher: Any,
    tokenizer: PreTrainedTokenizerBase,
    cache_dir: Path,
    *,
    teacher_weights: str,
    exclude: Sequence[str] = (),
) -> list[Sample]:
    """The teacher's text for training (``data.teacher_generated_fraction``): completions of
    :func:`training_prompts` and, for ``data.generated_own_share`` of them, of questions the
    teacher wrote itself (:func:`teacher_questions` under
    :data:`~distill.prompts.OWN_TRAIN_SEED`, never one in ``exclude``: the evaluation's),
    generated once and cached.

    Raises:
        CacheMismatchError: ``data.generated_dir`` holds another teacher's or prompt set's
            text.
    """
    from distill.data import tokenizer_fingerprint

    n_own = own_share_count(cfg, tokenizer)
    prompts = (
        training_prompts(cfg, tokenizer, cfg.generated_prompts - n_own)
        if n_own < cfg.generated_prompts
        else []
    )
    if n_own:
        seed = OWN_TRAIN_SEED + cfg.split_seed
        questions = teacher_questions(
            teacher,
            tokenizer,
            n_own,
            seed=seed,
            teacher_weights=teacher_weights,
            batch_size=cfg.generated_batch_size,
            cache_dir=cache_dir,
            exclude=exclude,
            what="training text: the teacher's own questions",
        )
        prompts += own_prompts(tokenizer, questions, seed)
    return teacher_samples(
        teacher,
        tokenizer_fingerprint(tokenizer),
        prompts,
        teacher_weights=teacher_weights,
        max_new_tokens=cfg.generated_tokens,
        temperature=cfg.generated_temperature,
        seed=TRAIN_PROMPT_SEED + cfg.split_seed,
        batch_size=cfg.generated_batch_size,
        cache_dir=cache_dir,
        folder=cfg.generated_dir,
        fix="data.generated_dir",
        what="training text",
    ).samples


OWN = "own"
# Drafts sampled per question wanted (the filters drop cut-off, looping and repeated ones),
# and the tokens a draft may take.
DRAFTS_PER_QUESTION = 4
QUESTION_TOKENS = 48


def teacher_questions(
    teacher: Any,
    tokenizer: PreTrainedTokenizerBase,
    num_questions: int,
    *,
    seed: int,
    teacher_weights: str,
    batch_size: int,
    cache_dir: Path,
    exclude: Sequence[str] = (),
    what: str = "the teacher's own questions",
) -> list[str]:
    """Up to ``num_questions`` questions the teacher writes itself: ``DRAFTS_PER_QUESTION``
    times as many drafts sampled at temperature 1 after its chat template's user prefix
    (:func:`~distill.prompts.user_prefix`), cached like any teacher text, then filtered by
    :func:`~distill.prompts.usable_questions` (``exclude``: questions never to return).

    Raises:
        PromptError: the tokenizer has no chat template.
    """
    from distill.data import tokenizer_fingerprint

    prefix = user_prefix(tokenizer)
    drafts = teacher_samples(
        teacher,
        tokenizer_fingerprint(tokenizer),
        [
            Prompt(OWN, f"{OWN}:{seed}#{i}", prefix)
            for i in range(num_questions * DRAFTS_PER_QUESTION)
        ],
        teacher_weights=teacher_weights,
        max_new_tokens=QUESTION_TOKENS,
        temperature=1.0,
        seed=seed,
        batch_size=batch_size,
        cache_dir=cache_dir,
        what=what,
    ).samples
    stops = set(stop_ids(teacher))
    texts = []
    for sample in drafts:
        ended = bool(sample.completion) and sample.completion[-1] in stops
        body = sample.completion[:-1] if ended else sample.completion
        texts.append((tokenizer.decode(list(body), skip_special_tokens=True), ended))
    questions = usable_questions(texts, exclude=exclude)[:num_questions]
    if len(questions) < num_questions:
        log.warning(
            "%s: %d usable of %d drafts, %d wanted",
            what,
            len(questions),
            len(drafts),
            num_questions,
        )
    return questions


def own_prompts(
    tokenizer: PreTrainedTokenizerBase, questions: Sequence[str], seed: int
) -> list[Prompt]:
    """The teacher's questions as chat turns ready for its answer."""
    return [
        Prompt(OWN, f"{OWN}:{seed}#{i}", chat_tokens(tokenizer, q)) for i, q in enumerate(questions)
    ]


# The batch the general set's questions are drafted in: part of the set (sampled per batch),
# so fixed apart from eval.generation_batch_size, which only says how answers are batched.
GENERAL_QUESTIONS_BATCH = 16


def general_questions(
    cfg: PipelineConfig, teacher: Any, tokenizer: PreTrainedTokenizerBase, teacher_weights: str
) -> list[str]:
    """The questions of the evaluation's ``general`` set (``eval.general_prompts`` of them):
    the teacher's own, drawn under :data:`~distill.prompts.GENERAL_SEED`, a seed training
    never uses; training drops any of them from its own questions.

    Raises:
        PromptError: the tokenizer has no chat template.
    """
    from distill.caches import cache_root

    return teacher_questions(
        teacher,
        tokenizer,
        cfg.eval.general_prompts,
        seed=GENERAL_SEED + cfg.data.split_seed,
        teacher_weights=teacher_weights,
        batch_size=GENERAL_QUESTIONS_BATCH,
        cache_dir=cache_root(cfg),
        what="fidelity: the teacher's own questions",
    )
