"""Corpus loading, the deterministic train/val split, tokenization and packing.

A corpus is a list of :class:`Document`. Documents are split into train and val by a hash of
their id (stable across runs, machines and document order), each split is tokenized with the
teacher's tokenizer, documents are joined with the EOS token and cut into ``block_size``
blocks. The packed blocks are cached with ``datasets`` under a key that covers everything
they depend on.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from distill.errors import DistillError
from distill.run_dir import process_tag

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from distill.config import DataConfig, PipelineConfig


class DataError(DistillError):
    """The corpus cannot be used as configured."""


TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
RECORD_SUFFIXES = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


@dataclass(frozen=True)
class Document:
    doc_id: str
    text: str


@dataclass
class PackedSplits:
    """Token blocks, each ``(num_blocks, block_size)`` int64."""

    train: torch.Tensor
    val: torch.Tensor
    cache_path: Path | None = None


def check_data_inputs(cfg: DataConfig) -> None:
    """Checks run before any model loads: every data file exists, is not empty and reads as
    what its suffix says (UTF-8 text, JSON or JSONL records, a Parquet file with the text
    column), so an unreadable file is named in one line before any other work.

    Raises:
        DataError: naming the path, what is wrong with it and the fix.
    """
    if cfg.source != "text_files":
        return
    for path in expand_paths(cfg.paths):
        if os.path.getsize(path) == 0:
            raise DataError(f"data file {path} is empty: remove it from data.paths")
        suffix = Path(path).suffix.lower()
        if suffix == ".parquet":
            _check_parquet(path, cfg.text_column)
        else:  # text and JSON: reading them whole is what loading does anyway
            _file_documents(path, cfg.text_column)


def _check_parquet(path: str, text_column: str) -> None:
    """The footer and schema only: a truncated or foreign file fails here, in one line."""
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
    except Exception as err:  # ArrowInvalid and friends: the cause, not the trace
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"data file {path} is not a readable Parquet file: {first}") from None
    if text_column not in names:
        raise DataError(
            f"data file {path} has no column {text_column!r} (columns: {names}): "
            "set data.text_column"
        )


def expand_paths(patterns: list[str]) -> list[str]:
    """Files named by ``patterns`` (paths or globs), sorted, each pattern matching something.

    Raises:
        DataError: for a pattern that names no file.
    """
    files: list[str] = []
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        matches = sorted(glob.glob(expanded, recursive=True))
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise DataError(f"data.paths entry {pattern!r} matches no file: check the path or glob")
        files.extend(matches)
    return files


def load_documents(cfg: DataConfig) -> list[Document]:
    """Read the configured corpus as documents.

    Raises:
        DataError: missing files, empty corpus, or a missing text column.
    """
    if cfg.source == "pydoc":
        docs = _pydoc_documents()
    elif cfg.source == "text_files":
        docs = []
        for path in expand_paths(cfg.paths):
            docs.extend(_file_documents(path, cfg.text_column))
    elif cfg.source == "hf":
        docs = _hf_documents(cfg)
    else:  # the schema already rejects this; kept so a new source cannot fall through
        raise DataError(f"unknown data.source {cfg.source!r}")
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise DataError(
            f"corpus data.source={cfg.source} holds no text: point data at a non-empty corpus"
        )
    if cfg.max_documents is not None:
        docs = docs[: cfg.max_documents]
    return docs


def _pydoc_documents() -> list[Document]:
    # Each topic of CPython's help() system is an English document; sorted for stable ids.
    from pydoc_data.topics import topics

    return [Document(f"pydoc:{key}", topics[key]) for key in sorted(topics)]


def _file_documents(path: str, text_column: str) -> list[Document]:
    suffix = Path(path).suffix.lower()
    if suffix in RECORD_SUFFIXES:
        return _record_documents(path, RECORD_SUFFIXES[suffix], text_column)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"data file {path} is not UTF-8 text: convert it or remove it") from None
    if not text.strip():
        raise DataError(f"data file {path} is empty: remove it from data.paths")
    return [Document(path, text)]


def _record_documents(path: str, builder: str, text_column: str) -> list[Document]:
    if builder == "json":
        records = _read_json_records(path)
        if not records:
            raise DataError(f"data file {path} holds no records")
        columns = sorted({k for r in records for k in r})
        if text_column not in columns:
            raise DataError(
                f"data file {path} has no column {text_column!r} (columns: {columns}): "
                f"set data.text_column"
            )
        return [
            Document(f"{path}#{i}", str(r.get(text_column) or "")) for i, r in enumerate(records)
        ]
    import pyarrow.parquet as pq

    _check_parquet(path, text_column)
    table = pq.read_table(path, columns=[text_column])
    if text_column not in table.column_names:
        raise DataError(
            f"data file {path} has no column {text_column!r} (columns: {table.column_names}): "
            f"set data.text_column"
        )
    texts = table.column(text_column).to_pylist()
    return [Document(f"{path}#{i}", str(t or "")) for i, t in enumerate(texts)]


def _read_json_records(path: str) -> list[dict]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"data file {path} is not UTF-8 JSON: convert it or remove it") from None
    stripped = text.lstrip()
    try:
        if stripped.startswith("["):
            records = json.loads(text)
        else:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as err:
        raise DataError(f"data file {path} is not valid JSON/JSONL: {err}") from None
    if not all(isinstance(r, dict) for r in records):
        raise DataError(f"data file {path}: every record must be a JSON object")
    return records


def _hf_documents(cfg: DataConfig) -> list[Document]:
    import datasets

    kwargs = {"split": cfg.split}
    if cfg.data_files:
        kwargs["data_files"] = list(cfg.data_files)
    try:
        ds = datasets.load_dataset(cfg.path, cfg.name, **kwargs)
    except Exception as err:  # offline, unknown name, bad split: one line with the cause
        raise DataError(
            f"datasets.load_dataset({cfg.path!r}, {cfg.name!r}, split={cfg.split!r}) failed: "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        ) from None
    if cfg.text_column not in ds.column_names:
        raise DataError(
            f"dataset {cfg.path} has no column {cfg.text_column!r} (columns: {ds.column_names}): "
            f"set data.text_column"
        )
    return [Document(f"{cfg.path}#{i}", str(t or "")) for i, t in enumerate(ds[cfg.text_column])]


def split_documents(
    docs: list[Document], val_fraction: float, seed: int
) -> tuple[list[Document], list[Document]]:
    """Assign documents to val in the order of a hash of ``(seed, doc_id)``.

    Documents join val until it holds ``val_fraction`` of the characters, so one long
    document cannot swallow the split. With a single document the text itself is split: its
    last ``val_fraction`` of characters
    (cut at a line break when there is one) become val. At least one document goes to each
    side when there are two or more.
    """
    if len(docs) == 1:
        text = docs[0].text
        cut = int(len(text) * (1.0 - val_fraction))
        newline = text.rfind("\n", 0, cut)
        if newline > cut // 2:
            cut = newline + 1
        return [Document(docs[0].doc_id, text[:cut])], [
            Document(docs[0].doc_id + "#val", text[cut:])
        ]

    def score(doc: Document) -> float:
        digest = hashlib.sha256(f"{seed}:{doc.doc_id}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64

    target = val_fraction * sum(len(d.text) for d in docs)
    val_ids: set[str] = set()
    val_chars = 0
    for doc in sorted(docs, key=score):
        if len(val_ids) == len(docs) - 1:
            break
        if val_ids and val_chars + len(doc.text) > target:
            continue  # too long to fit the budget; a shorter one later may
        val_ids.add(doc.doc_id)
        val_chars += len(doc.text)
    train = [d for d in docs if d.doc_id not in val_ids]
    val = [d for d in docs if d.doc_id in val_ids]
    return train, val


def pack_documents(
    docs: list[Document], tokenizer: PreTrainedTokenizerBase, block_size: int
) -> torch.Tensor:
    """Tokenize, join with EOS and cut into ``(num_blocks, block_size)`` blocks.

    The tail shorter than one block is dropped, so every position is a real token and no
    padding or attention mask is needed.
    """
    token_lists = [tokenizer(d.text, add_special_tokens=False)["input_ids"] for d in docs]
    return pack_token_lists(token_lists, tokenizer.eos_token_id, block_size)


def pack_token_lists(
    token_lists: Sequence[Sequence[int]], eos: int | None, block_size: int
) -> torch.Tensor:
    """Join token sequences into one stream, each ended by ``eos`` unless it already ends with
    it, and cut it into ``(num_blocks, block_size)`` blocks (the short tail dropped)."""
    stream: list[int] = []
    for ids in token_lists:
        stream.extend(ids)
        if eos is not None and (not ids or ids[-1] != eos):
            stream.append(eos)
    num_blocks = len(stream) // block_size
    if num_blocks == 0:
        return torch.empty((0, block_size), dtype=torch.long)
    return torch.tensor(stream[: num_blocks * block_size], dtype=torch.long).view(
        num_blocks, block_size
    )


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of the vocabulary and special tokens: changes whenever token ids would."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    payload = json.dumps([vocab, tokenizer.eos_token_id, type(tokenizer).__name__])
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def corpus_fingerprint(docs: list[Document]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(d.doc_id.encode())
        h.update(b"\0")
        h.update(d.text.encode())
        h.update(b"\1")
    return h.hexdigest()[:16]


def blocks_hash(blocks: torch.Tensor) -> str:
    """sha256 (16 hex digits) of the packed training blocks ``(num_blocks, block_size)``."""
    t = blocks.to("cpu", torch.int64).contiguous()
    h = hashlib.sha256(f"{tuple(t.shape)}".encode())
    h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def prepare_data(
    cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, cache_dir: Path | None
) -> PackedSplits:
    """Load, split, tokenize and pack the corpus, reusing a cached copy when one matches.

    Raises:
        DataError: when either split is too short to fill one block.
    """
    docs = load_documents(cfg)
    train_docs, val_docs = split_documents(docs, cfg.val_fraction, cfg.split_seed)
    key = hashlib.sha256(
        json.dumps(
            [
                corpus_fingerprint(train_docs),
                corpus_fingerprint(val_docs),
                tokenizer_fingerprint(tokenizer),
                cfg.block_size,
            ]
        ).encode()
    ).hexdigest()[:16]
    path = None if cache_dir is None else cache_dir / "data" / key
    if path is not None and (path / "COMPLETE").exists():
        import datasets

        loaded = datasets.load_from_disk(str(path)).with_format("numpy")
        train = torch.from_numpy(loaded["train"]["input_ids"][:]).long()
        val = torch.from_numpy(loaded["val"]["input_ids"][:]).long()
        return PackedSplits(train=train, val=val, cache_path=path)

    train = pack_documents(train_docs, tokenizer, cfg.block_size)
    val = pack_documents(val_docs, tokenizer, cfg.block_size)
    for name, blocks, split_docs in (("train", train, train_docs), ("val", val, val_docs)):
        if blocks.shape[0] == 0:
            num_tokens = sum(
                len(tokenizer(d.text, add_special_tokens=False)["input_ids"]) for d in split_docs
            )
            raise DataError(
                f"the {name} split has {num_tokens} tokens ({len(split_docs)} document(s)), "
                f"fewer than one block of data.block_size={cfg.block_size}: lower "
                f"data.block_size or add text"
            )
    if path is not None:
        _save_splits(path, train, val)
    return PackedSplits(train=train, val=val, cache_path=path)


def _save_splits(path: Path, train: torch.Tensor, val: torch.Tensor) -> None:
    import datasets

    # Written to a staging folder and renamed, so an interrupted run never leaves a
    # half-written cache that a later run would trust.
    staging = path.with_name(f".{path.name}.tmp-{process_tag()}")
    dsd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"input_ids": train.tolist()}),
            "val": datasets.Dataset.from_dict({"input_ids": val.tolist()}),
        }
    )
    dsd.save_to_disk(str(staging))
    (staging / "COMPLETE").write_text("ok\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(staging, path)
    except OSError:  # another process won the race; its copy is identical
        import shutil

        shutil.rmtree(staging, ignore_errors=True)


def batch_indices(num_blocks: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Block indices of global micro-batch ``step``: a pure function of the step.

    Epoch ``e`` visits the blocks in ``randperm(num_blocks)`` seeded by ``(seed, e)``. Because
    the order depends only on the step, resuming needs no data-loader state.
    """
    per_epoch = num_blocks // batch_size
    if per_epoch == 0:
        raise DataError(
            f"the train split has {num_blocks} block(s), fewer than train.batch_size="
            f"{batch_size}: lower train.batch_size or data.block_size"
        )
    epoch, offset = divmod(step, per_epoch)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(num_blocks, generator=gen)
    return order[offset * batch_size : (offset + 1) * batch_size].tolist()


def mix_blocks(corpus: torch.Tensor, generated: torch.Tensor, fraction: float) -> torch.Tensor:
    """Training blocks of which ``fraction`` are ``generated`` and the rest ``corpus``.

    Nothing is thrown away: the side that is short of its share is repeated whole (then cut)
    until the shares hold, so a few hundred teacher samples mix with a large corpus, or a
    small corpus with many samples. ``fraction`` 1 gives ``generated`` alone. Corpus blocks
    come first, then the generated ones; the batch order is shuffled by
    :func:`batch_indices` anyway.

    Raises:
        DataError: ``generated`` holds no block, or ``fraction`` is outside (0, 1].
    """
    if not 0.0 < fraction <= 1.0:
        raise DataError(f"data.teacher_generated_fraction={fraction}: must be in (0, 1]")
    if generated.shape[0] == 0:
        raise DataError(
            "the teacher's generated text fills no training block: raise "
            "data.generated_prompts or data.generated_tokens, or lower data.block_size"
        )
    if fraction == 1.0:
        return generated
    num_c, num_g = corpus.shape[0], generated.shape[0]
    if num_g / fraction >= num_c / (1.0 - fraction):
        num_c = round(num_g * (1.0 - fraction) / fraction)  # the corpus is short: repeat it
    else:
        num_g = round(num_c * fraction / (1.0 - fraction))  # the samples are short
    return torch.cat([_repeat_to(corpus, num_c), _repeat_to(generated, num_g)])


def _repeat_to(blocks: torch.Tensor, count: int) -> torch.Tensor:
    reps = -(-count // blocks.shape[0])
    return blocks.repeat(reps, 1)[:count]


def splits_for(
    cfg: PipelineConfig, tokenizer: PreTrainedTokenizerBase, splits: PackedSplits | None
) -> PackedSplits:
    """The run's packed splits: ``splits`` when the caller already holds them (the pipeline
    prepares them once for every stage), else :func:`prepare_data` of ``cfg.data`` (cached).
    Held-out blocks come from ``val``; calibration and search blocks from ``train``, so the
    blocks that score a variant never shape it."""
    if splits is not None:
        return splits
    from distill.caches import cache_root

    return prepare_data(cfg.data, tokenizer, cache_root(cfg))
