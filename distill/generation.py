"""Prompts drawn from documents, batched generation, and the cache of the teacher's own text.

Three parts of the pipeline need text a model writes:

* the training data the teacher writes (``data.teacher_generated_fraction``, sequence-level KD),
* the evaluation set of the teacher's own text and each variant's answers to held-out chat
  prompts (:mod:`distill.evaluate.fidelity`),
* on-policy distillation, where the student samples during training.

They share :func:`generate` (left-padded batches through ``model.generate`` with a KV cache,
seeded so the same call gives the same tokens) and the prompt makers. The teacher's text is
generated once and cached (:func:`teacher_samples`) under ``cache_root/teacher_text/<key>/``
with a manifest of everything it depends on (teacher weights, tokenizer, prompts, generation
settings), so every run that shares them reuses it and a folder made for anything else is
refused by name.

Chat prompts wrap a passage of a document in one of a few instructions and go through the
tokenizer's chat template, so an instruct teacher answers as it was tuned to; a tokenizer
without a chat template gets continuation prompts only.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from distill.config import DataConfig, DistillError
from distill.run_dir import manifest_differences, write_json_atomic

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from distill.data import Document

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SAMPLES = "samples.json"
FORMAT_VERSION = 1
KINDS = ("continuation", "chat")

# Instructions a user might give about a passage; {passage} is a window of a document. Written
# for any prose corpus, so prompts can be drawn from whatever the user trains on.
CHAT_INSTRUCTIONS = (
    "Explain in simple words what this text says:\n\n{passage}",
    "What is the main point of the following text?\n\n{passage}",
    "Summarize this in two or three sentences:\n\n{passage}",
    "Give a short example that illustrates the following:\n\n{passage}",
    "A student read this and is confused. Help them understand it:\n\n{passage}",
    "Write one question a reader might ask about this text, then answer it:\n\n{passage}",
)
# Characters of a document put into a chat prompt.
PASSAGE_CHARS = 360


class GenerationError(DistillError):
    """Text cannot be generated or a cached generation cannot be used."""


class GenerationCacheMismatch(GenerationError):
    """The cached generations were made by another teacher, tokenizer, prompt set or settings."""

    def __init__(self, message: str, mismatched: list[str]) -> None:
        super().__init__(message)
        self.mismatched = mismatched


@dataclass(frozen=True)
class Prompt:
    """One prompt: its ``kind`` (continuation or chat), where it came from, its token ids."""

    kind: str
    source: str
    tokens: tuple[int, ...]


@dataclass(frozen=True)
class Sample:
    """A prompt and the tokens a model wrote after it (EOS included when it stopped)."""

    kind: str
    source: str
    prompt: tuple[int, ...]
    completion: tuple[int, ...]


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_tokens(tokenizer: PreTrainedTokenizerBase, message: str) -> tuple[int, ...]:
    """``message`` as one user turn through the chat template, ready for the answer."""
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": message}], add_generation_prompt=True, tokenize=True
    )
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # some versions return a BatchEncoding
        ids = ids["input_ids"]
    return tuple(int(i) for i in ids)


def _order(docs: Sequence[Document], seed: int) -> list[int]:
    # A hash of (seed, document id): the same prompts whatever order the corpus was read in.
    def key(i: int) -> str:
        return hashlib.sha256(f"{seed}:{docs[i].doc_id}".encode()).hexdigest()

    return sorted(range(len(docs)), key=key)


def _window(text: str, index: int, chars: int) -> tuple[int, str]:
    """The ``index``-th window of ``text``, starting at a line start where there is one."""
    if len(text) <= chars:
        return 0, text
    starts = [0] + [i + 1 for i, c in enumerate(text[:-chars]) if c == "\n"]
    start = starts[(index * 7919) % len(starts)]
    return start, text[start : start + chars]


def make_prompts(
    docs: Sequence[Document],
    tokenizer: PreTrainedTokenizerBase,
    num_prompts: int,
    *,
    chat_share: float,
    prompt_tokens: int,
    seed: int,
) -> list[Prompt]:
    """``num_prompts`` prompts from ``docs``: a ``chat_share`` of them chat turns (when the
    tokenizer has a chat template), the rest the first ``prompt_tokens`` tokens of a window.

    Documents are visited in a seeded hash order, round after round (another window of each
    document every round), so a small corpus still gives many distinct prompts.

    Raises:
        GenerationError: no document has text, or a setting is out of range.
    """
    if num_prompts < 1 or prompt_tokens < 1 or not 0.0 <= chat_share <= 1.0:
        raise GenerationError(
            f"prompts: num_prompts={num_prompts} and prompt_tokens={prompt_tokens} must be "
            f">= 1 and chat_share={chat_share} in [0, 1]"
        )
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise GenerationError("no document with text to draw prompts from")
    chat = has_chat_template(tokenizer)
    num_chat = round(num_prompts * chat_share) if chat else 0
    order = _order(docs, seed)
    prompts: list[Prompt] = []
    for i in range(num_prompts):
        doc = docs[order[i % len(docs)]]
        round_ = i // len(docs)
        if i < num_chat:
            start, passage = _window(doc.text, round_, PASSAGE_CHARS)
            template = CHAT_INSTRUCTIONS[(i + seed) % len(CHAT_INSTRUCTIONS)]
            tokens = chat_tokens(tokenizer, template.format(passage=passage.strip()))
            prompts.append(Prompt("chat", f"{doc.doc_id}@{start}", tokens))
        else:
            start, text = _window(doc.text, round_, prompt_tokens * 8)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"][:prompt_tokens]
            if ids:
                prompts.append(Prompt("continuation", f"{doc.doc_id}@{start}", tuple(ids)))
    return prompts


def prompts_hash(prompts: Sequence[Prompt]) -> str:
    h = hashlib.sha256()
    for p in prompts:
        h.update(json.dumps([p.kind, p.source, list(p.tokens)]).encode())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def stop_ids(model: Any) -> list[int]:
    """The ids that end an answer: the generation config's EOS ids, else the model config's."""
    gen = getattr(model, "generation_config", None)
    ids = _ids(getattr(gen, "eos_token_id", None)) if gen is not None else []
    return ids or _ids(model.config.eos_token_id)


def generate(
    model: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    batch_size: int,
    desc: str | None = None,
) -> list[tuple[int, ...]]:
    """What ``model`` writes after each prompt: at most ``max_new_tokens`` tokens, up to and
    including its first EOS. Greedy at ``temperature`` 0, else sampled from the full softmax
    at that temperature (no top-k or top-p: the model's own distribution).

    Prompts are left-padded into batches of ``batch_size`` in the given order and decoded with
    the KV cache under ``no_grad``; batch ``b`` samples under ``seed + b`` inside a forked RNG,
    so the call is deterministic and leaves the caller's random state untouched.

    Raises:
        GenerationError: an empty prompt, or settings out of range.
    """
    from transformers import GenerationConfig

    if max_new_tokens < 1 or batch_size < 1 or temperature < 0:
        raise GenerationError(
            f"generate: max_new_tokens={max_new_tokens} and batch_size={batch_size} must be "
            f">= 1, temperature={temperature} >= 0"
        )
    if any(len(p) == 0 for p in prompts):
        raise GenerationError("generate: a prompt has no tokens")
    eos = stop_ids(model)
    pad = _pad_id(model, eos)
    sample = temperature > 0
    gen_cfg = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=sample,
        temperature=temperature if sample else None,
        top_k=0 if sample else None,
        top_p=1.0 if sample else None,
        eos_token_id=eos or None,
        pad_token_id=pad,
    )
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[tuple[int, ...]] = []
    batches = [prompts[i : i + batch_size] for i in range(0, len(prompts), batch_size)]
    bar = tqdm(batches, desc=desc, unit="batch", leave=False, disable=desc is None)
    try:
        for b, batch in enumerate(bar):
            width = max(len(p) for p in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, p in enumerate(batch):
                ids[r, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
                mask[r, width - len(p) :] = 1
            devices = [device] if device.type == "cuda" else []
            with torch.no_grad(), torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed + b)
                new = model.generate(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    generation_config=gen_cfg,
                )[:, width:]
            for row in new.tolist():
                out.append(_until_eos(row, eos))
    finally:
        model.train(was_training)
    return out


def _pad_id(model: Any, eos: list[int]) -> int:
    """An id to fill padding with. Padded positions are masked, so any id the embedding holds
    will do: the pad id, else the first EOS id, else 0 (a config's EOS may lie outside a
    resized vocabulary, as GPT-2's 50256 does in a small one)."""
    vocab = model.get_input_embeddings().num_embeddings
    for candidate in (model.config.pad_token_id, *eos):
        if candidate is not None and 0 <= int(candidate) < vocab:
            return int(candidate)
    return 0


def _until_eos(row: list[int], eos: list[int]) -> tuple[int, ...]:
    for i, t in enumerate(row):
        if t in eos:
            return tuple(row[: i + 1])
    return tuple(row)


# --------------------------------------------------------------------------------------------
# The teacher's cached text
# --------------------------------------------------------------------------------------------


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
    format: int = FORMAT_VERSION

    def key(self) -> str:
        payload = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def check_generation_manifest(path: Path, expected: GenerationManifest) -> None:
    """Refuse generations made from anything else than ``expected`` describes.

    Raises:
        GenerationError: ``path`` holds no manifest.
        GenerationCacheMismatch: naming every field that differs, with both values.
    """
    file = path / MANIFEST
    if not file.exists():
        raise GenerationError(f"{path} holds no {MANIFEST}: it is not a teacher-text cache")
    mismatched, detail = manifest_differences(file, expected)
    if mismatched:
        raise GenerationCacheMismatch(
            f"teacher-text cache {path} was generated for another teacher, prompt set or "
            f"settings ({detail}): leave the folder setting null to get one keyed by this run, "
            "or point it at another folder",
            mismatched,
        )


def _read_samples(path: Path) -> list[Sample]:
    rows = json.loads((path / SAMPLES).read_text())
    return [
        Sample(r["kind"], r["source"], tuple(r["prompt"]), tuple(r["completion"])) for r in rows
    ]


def teacher_samples(
    teacher: Any,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    *,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    batch_size: int,
    cache_dir: Path,
    folder: str | Path | None = None,
    what: str = "teacher text",
    teacher_weights: str | None = None,
) -> list[Sample]:
    """The teacher's completions of ``prompts``, generated once and cached.

    ``teacher_weights`` is the teacher's :func:`~distill.models.footprint.weights_hash` when
    the caller already has it (hashing reads every weight: once per run is enough).

    The folder is ``folder`` when given, else ``cache_dir/teacher_text/<manifest key>``. A
    folder with a manifest is read when the manifest matches and refused otherwise. Every
    file is renamed into place whole; the completions are saved a few batches at a time
    (:func:`_generate_in_parts`), so an interrupted run resumes where it stopped, and
    ``COMPLETE`` marks the finished set.

    Raises:
        GenerationCacheMismatch: ``folder`` holds generations for another teacher, prompt
            set or settings.
    """
    from distill.data import tokenizer_fingerprint
    from distill.models.footprint import weights_hash

    manifest = GenerationManifest(
        teacher_weights=teacher_weights or weights_hash(teacher),
        tokenizer=tokenizer_fingerprint(tokenizer),
        prompts=prompts_hash(prompts),
        num_prompts=len(prompts),
        max_new_tokens=max_new_tokens,
        temperature=float(temperature),
        seed=seed,
    )
    path = Path(folder).expanduser() if folder else cache_dir / "teacher_text" / manifest.key()
    if (path / MANIFEST).exists():
        check_generation_manifest(path, manifest)
        if (path / "COMPLETE").exists():
            return _read_samples(path)
    log.info(
        "%s: the teacher writes %d completion(s) of up to %d tokens (once; cached in %s)",
        what,
        len(prompts),
        max_new_tokens,
        path,
    )
    path.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path / MANIFEST, asdict(manifest))
    completions = _generate_in_parts(
        teacher, prompts, path / "parts", max_new_tokens, temperature, seed, batch_size, what
    )
    samples = [
        Sample(p.kind, p.source, p.tokens, c) for p, c in zip(prompts, completions, strict=True)
    ]
    write_json_atomic(path / SAMPLES, [asdict(s) for s in samples])
    (path / "COMPLETE").touch()
    for part in sorted((path / "parts").glob("*.json")):
        part.unlink()
    return samples


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
    """:func:`generate` over ``prompts``, a few batches at a time, each part saved under
    ``parts`` as it finishes and read back on a rerun. Part ``i`` starts at batch ``b`` and is
    generated with seed ``seed + b``, which is exactly what one whole call gives batch ``b``,
    so a resumed generation equals an uninterrupted one."""
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


# Prompt seeds: training prompts and the held-out evaluation prompts come from disjoint
# documents (the train / val split); distinct seeds also keep their windows apart when a user
# points both at one corpus.
TRAIN_PROMPT_SEED = 1_000


def training_samples(
    cfg: DataConfig, teacher: Any, tokenizer: PreTrainedTokenizerBase, cache_dir: Path
) -> list[Sample]:
    """The teacher's text for training (``data.teacher_generated_fraction``): completions of
    prompts drawn from the training documents only, generated once and cached.

    Raises:
        GenerationCacheMismatch: ``data.generated_dir`` holds another teacher's or prompt
            set's text.
    """
    from distill.data import load_documents, split_documents

    train_docs, _ = split_documents(load_documents(cfg), cfg.val_fraction, cfg.split_seed)
    prompts = make_prompts(
        train_docs,
        tokenizer,
        cfg.generated_prompts,
        chat_share=cfg.generated_chat_share,
        prompt_tokens=cfg.generated_prompt_tokens,
        seed=TRAIN_PROMPT_SEED + cfg.split_seed,
    )
    return teacher_samples(
        teacher,
        tokenizer,
        prompts,
        max_new_tokens=cfg.generated_tokens,
        temperature=cfg.generated_temperature,
        seed=TRAIN_PROMPT_SEED + cfg.split_seed,
        batch_size=cfg.generated_batch_size,
        cache_dir=cache_dir,
        folder=cfg.generated_dir,
        what="training text",
    )
