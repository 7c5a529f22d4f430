"""The cached teacher: its top-k log-probabilities per position, computed once, reused.

Online distillation runs the teacher forward on every step of every epoch of every run of a
sweep. The cache runs it once per training block and keeps, per position, the teacher's
``k`` most probable tokens (float16 log-probabilities, uint16 ids while the vocabulary fits
in 16 bits) plus the log of the remaining mass (float32): ``4k + 4`` bytes against
``2V`` for full-vocabulary float16 (260 bytes vs 98,304 for k = 64, V = 49,152). Losses use
it through :class:`distill.train.losses.TopKTeacher`.

A cache folder (``cache_root/teacher_logits/<key>/``) holds::

    manifest.json            teacher weights hash, tokenizer hash, data hash, block size,
                             k, temperature, vocabulary size
    shard-<id>.safetensors   block_index (n,) int64, logprobs (n, T-1, k), ids (n, T-1, k),
                             tail (n, T-1): rows of whole blocks

``key`` is a hash of the manifest, so runs that would read the same numbers share one
cache, and anything that changes them (another teacher, tokenizer, corpus, block size, k or
temperature) gets another. Blocks are indexed by their position in ``data.train``, so
:func:`distill.data.batch_indices` picks cached rows exactly as it picks blocks. A run builds
only the blocks it will visit that are not there yet, so a short run pays for a short pass
and a later, longer run adds the rest. Shards are written whole and renamed into place: an
interrupted build leaves complete shards behind and resumes from them.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from distill.caches import (
    MANIFEST,
    CacheError,
    CacheMismatchError,
    cache_root,
    check_manifest,
    claim,
    manifest_key,
)
from distill.config import PipelineConfig, TrainConfig
from distill.data import batch_indices, blocks_hash, tokenizer_fingerprint
from distill.models import weights_hash
from distill.train.chunked_loss import Head, fused_head
from distill.train.losses import TopKTeacher

log = logging.getLogger(__name__)

__all__ = ["MANIFEST", "CacheMismatchError", "TeacherCache", "TeacherCacheError"]

FORMAT_VERSION = 1
# What the cache folders are called in messages, and the setting that points elsewhere.
WHAT = "teacher cache"
FIX = "train.teacher_cache_dir"
# Rows of blocks per shard file are chosen to make shards about this size.
SHARD_BYTES = 64 << 20
# Above this many batch_indices() calls, a run caches every block instead of working out
# exactly which ones it visits (each call draws a permutation of all blocks).
_MAX_SCHEDULE_CALLS = 2000


class TeacherCacheError(CacheError):
    """A teacher cache cannot be used."""


@dataclass(frozen=True)
class CacheManifest:
    """Everything the cached numbers depend on; two runs with equal manifests share a cache."""

    teacher_weights: str
    tokenizer: str
    data: str
    block_size: int
    top_k: int
    temperature: float
    vocab_size: int
    format: int = FORMAT_VERSION

    def id_dtype(self) -> torch.dtype:
        return torch.uint16 if self.vocab_size <= 1 << 16 else torch.int32

    def bytes_per_position(self) -> int:
        """Stored bytes per scored position: k log-probs, k ids, one tail."""
        id_bytes = 2 if self.id_dtype() == torch.uint16 else 4
        return self.top_k * (2 + id_bytes) + 4


def manifest_for(
    teacher: torch.nn.Module,
    tokenizer: Any,
    train_blocks: Tensor,
    top_k: int,
    temperature: float,
    teacher_key: str | None = None,
) -> CacheManifest:
    """The manifest a cache for this teacher, data and loss setting must carry.

    ``teacher_key`` is the teacher's weights hash when the caller has it (the run's
    :class:`~distill.models.Teacher` computes it once); hashed here when None.

    Raises:
        TeacherCacheError: ``top_k`` exceeds the teacher's vocabulary.
    """
    vocab = int(teacher.config.vocab_size)
    if not 1 <= top_k <= vocab:
        raise TeacherCacheError(
            f"train.teacher_top_k={top_k}: must be between 1 and the teacher's vocabulary "
            f"size {vocab}"
        )
    return CacheManifest(
        teacher_weights=teacher_key or weights_hash(teacher),
        tokenizer=tokenizer_fingerprint(tokenizer),
        data=blocks_hash(train_blocks),
        block_size=int(train_blocks.shape[1]),
        top_k=int(top_k),
        temperature=float(temperature),
        vocab_size=vocab,
    )


def cache_path(cfg: PipelineConfig, manifest: CacheManifest) -> Path:
    """``train.teacher_cache_dir`` when set, else ``cache_root/teacher_logits/<key>``."""
    if cfg.train.teacher_cache_dir:
        return Path(cfg.train.teacher_cache_dir).expanduser()
    return cache_root(cfg) / "teacher_logits" / manifest_key(manifest)


class TeacherCache:
    """Read side: which blocks are cached, and their top-k rows for a batch of block indices."""

    def __init__(self, path: Path, manifest: CacheManifest) -> None:
        from safetensors import safe_open

        self.path = path
        self.manifest = manifest
        self._handles: dict[Path, Any] = {}
        self.index: dict[int, tuple[Path, int]] = {}
        for shard in sorted(path.glob("shard-*.safetensors")):
            handle = safe_open(str(shard), framework="pt")
            self._handles[shard] = handle
            for row, block in enumerate(handle.get_tensor("block_index").tolist()):
                self.index.setdefault(int(block), (shard, row))

    @classmethod
    def open(cls, path: Path, expected: CacheManifest) -> TeacherCache:
        """Open the cache in ``path`` after checking its manifest.

        Raises:
            TeacherCacheError / CacheMismatchError: see :func:`check_manifest`.
        """
        check_manifest(path, expected, what=WHAT, fix=FIX)
        return cls(path, expected)

    def missing(self, block_ids: list[int]) -> list[int]:
        return sorted({int(b) for b in block_ids} - self.index.keys())

    def lookup(self, block_ids: Tensor | list[int], device: torch.device | str) -> TopKTeacher:
        """The teacher's top-k rows ``(B, block_size - 1, k)`` for training blocks ``block_ids``.

        Raises:
            TeacherCacheError: a block is not cached.
        """
        ids = [int(b) for b in (block_ids.tolist() if isinstance(block_ids, Tensor) else block_ids)]
        absent = self.missing(ids)
        if absent:
            raise TeacherCacheError(
                f"teacher cache {self.path} lacks training block(s) {absent[:5]}: it was built "
                "for a shorter run; rerun with train.teacher_mode=cached to extend it"
            )
        parts: dict[str, list[Tensor]] = {"logprobs": [], "ids": [], "tail": []}
        for block in ids:
            shard, row = self.index[block]
            handle = self._handles[shard]
            for name in parts:
                parts[name].append(handle.get_slice(name)[row : row + 1])
        # Outside autocast: CPU autocast refuses to concatenate the stored float16 rows.
        with torch.autocast("cpu", enabled=False):
            return TopKTeacher(
                logprobs=torch.cat(parts["logprobs"]).to(device=device, dtype=torch.float32),
                ids=torch.cat(parts["ids"]).to(torch.int64).to(device),
                tail=torch.cat(parts["tail"]).to(device=device, dtype=torch.float32),
            )

    def stored_bytes(self) -> int:
        return sum(p.stat().st_size for p in self._handles)


@torch.inference_mode()
def teacher_top_k(
    teacher: torch.nn.Module,
    input_ids: Tensor,
    *,
    top_k: int,
    temperature: float,
    head: Head | None,
    chunk_size: int = 256,
) -> TopKTeacher:
    """The teacher's top-k view ``(b, T-1, k)`` of blocks ``input_ids`` ``(b, T)``.

    With ``head`` the logits are made ``chunk_size`` positions at a time from the final hidden
    states, so a batch never holds its full ``(b, T, V)`` logits.
    """
    b, t = input_ids.shape
    if head is not None:
        out = teacher(input_ids=input_ids, output_hidden_states=True, logits_to_keep=1)
        rows = out.hidden_states[-1][:, :-1].reshape(b * (t - 1), -1)
        weight, bias = head
    else:
        rows = teacher(input_ids=input_ids).logits[:, :-1].reshape(b * (t - 1), -1)
    pieces = []
    for start in range(0, rows.shape[0], chunk_size):
        chunk = rows[start : start + chunk_size]
        logits = torch.nn.functional.linear(chunk, weight, bias) if head is not None else chunk
        pieces.append(TopKTeacher.from_logits(logits, top_k, temperature))
    return TopKTeacher(
        logprobs=torch.cat([p.logprobs for p in pieces]).view(b, t - 1, top_k),
        ids=torch.cat([p.ids for p in pieces]).view(b, t - 1, top_k),
        tail=torch.cat([p.tail for p in pieces]).view(b, t - 1),
    )


def build_cache(
    path: Path,
    manifest: CacheManifest,
    teacher: torch.nn.Module,
    train_blocks: Tensor,
    block_ids: list[int] | None = None,
    *,
    batch_size: int = 8,
    chunk_size: int = 256,
    progress: bool = True,
) -> int:
    """Run the teacher over the blocks ``block_ids`` (None: all) missing from the cache in
    ``path`` and write them as shards. Returns how many blocks were added.

    Raises:
        CacheMismatchError: ``path`` holds a cache for another run.
    """
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    claim(path, manifest, what=WHAT, fix=FIX)
    wanted = list(range(len(train_blocks))) if block_ids is None else block_ids
    todo = TeacherCache(path, manifest).missing(wanted)
    if not todo:
        return 0
    head = fused_head(teacher)
    if isinstance(head, str):
        log.info("teacher cache: full teacher logits per batch (%s)", head)
        head = None
    device = next(teacher.parameters()).device
    per_block = (manifest.block_size - 1) * manifest.bytes_per_position()
    rows_per_shard = max(1, SHARD_BYTES // per_block)
    buffer: list[tuple[list[int], TopKTeacher]] = []

    def flush() -> None:
        if not buffer:
            return
        tensors = {
            "block_index": torch.tensor([i for ids, _ in buffer for i in ids], dtype=torch.int64),
            "logprobs": torch.cat([t.logprobs for _, t in buffer]).to("cpu", torch.float16),
            "ids": torch.cat([t.ids for _, t in buffer]).to("cpu", manifest.id_dtype()),
            "tail": torch.cat([t.tail for _, t in buffer]).to("cpu", torch.float32),
        }
        name = f"shard-{uuid.uuid4().hex[:12]}.safetensors"
        tmp = path / f".{name}.tmp"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, path / name)  # whole shards only: readers never see half of one
        buffer.clear()

    was_training = teacher.training
    teacher.eval()
    bar = tqdm(total=len(todo), desc="teacher cache", unit="block", disable=not progress)
    try:
        for start in range(0, len(todo), batch_size):
            ids = todo[start : start + batch_size]
            top = teacher_top_k(
                teacher,
                train_blocks[ids].to(device),
                top_k=manifest.top_k,
                temperature=manifest.temperature,
                head=head,
                chunk_size=chunk_size,
            )
            buffer.append((ids, top.to("cpu")))
            if sum(len(i) for i, _ in buffer) >= rows_per_shard:
                flush()
            bar.update(len(ids))
        flush()
    finally:
        bar.close()
        teacher.train(was_training)
    return len(todo)


def blocks_for_steps(num_blocks: int, tc: TrainConfig, world: int, start_step: int) -> list[int]:
    """Training blocks that steps ``start_step .. max_steps - 1`` read, over all processes.

    Exactly the blocks :func:`distill.data.batch_indices` returns for those steps, or all
    blocks when the run reads at least as many blocks as there are (or working it out would
    take too many permutations).
    """
    global_batch = tc.batch_size * world
    calls = max(0, tc.max_steps - start_step) * tc.grad_accum_steps
    if calls * global_batch >= num_blocks or calls > _MAX_SCHEDULE_CALLS:
        return list(range(num_blocks))
    seen: set[int] = set()
    for micro in range(start_step * tc.grad_accum_steps, tc.max_steps * tc.grad_accum_steps):
        seen.update(batch_indices(num_blocks, global_batch, micro, tc.seed))
    return sorted(seen)


def prepare(
    cfg: PipelineConfig,
    teacher: torch.nn.Module,
    teacher_key: str,
    tokenizer: Any,
    train_blocks: Tensor,
    block_ids: list[int] | None,
    is_main: bool,
    wait: Callable[[], None],
) -> TeacherCache:
    """The cache a ``train.teacher_mode=cached`` run reads: blocks missing from it are built
    by the main process (``wait`` is the barrier), then every process opens it.

    Raises:
        CacheMismatchError: ``train.teacher_cache_dir`` holds a cache for another run; raised
        on every process, before any work.
    """
    manifest = manifest_for(
        teacher, tokenizer, train_blocks, cfg.train.teacher_top_k, cfg.loss.temperature, teacher_key
    )
    path = cache_path(cfg, manifest)
    if (path / MANIFEST).exists():
        check_manifest(path, manifest, what=WHAT, fix=FIX)
    if is_main:
        added = build_cache(
            path,
            manifest,
            teacher,
            train_blocks,
            block_ids,
            batch_size=cfg.train.batch_size,
            chunk_size=cfg.loss.chunk_size or 256,
        )
        log.info("teacher cache %s: %d block(s) added", path, added)
    wait()
    return TeacherCache.open(path, manifest)


def run(cfg: PipelineConfig, run_dir: Path) -> Path:
    """``scripts/cache_teacher.py``: cache the teacher over every training block.

    Raises:
        DistillError: bad inputs, or an existing cache for another run at
        ``train.teacher_cache_dir``.
    """
    from distill.data import check_data_inputs, prepare_data
    from distill.models import load_teacher

    check_data_inputs(cfg.data)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher, tokenizer = load_teacher(cfg.pair.teacher, cache_root(cfg))
    teacher.to(device)
    data = prepare_data(cfg.data, tokenizer, cache_root(cfg))
    manifest = manifest_for(
        teacher, tokenizer, data.train, cfg.train.teacher_top_k, cfg.loss.temperature
    )
    path = cache_path(cfg, manifest)
    added = build_cache(
        path,
        manifest,
        teacher,
        data.train,
        None,
        batch_size=cfg.train.batch_size,
        chunk_size=cfg.loss.chunk_size or 256,
    )
    cache = TeacherCache.open(path, manifest)
    positions = len(cache.index) * (manifest.block_size - 1)
    per_token = cache.stored_bytes() / max(1, positions)
    full = 2 * manifest.vocab_size
    print(
        f"teacher cache {path}: {len(cache.index)} blocks ({added} new), "
        f"{per_token:.0f} bytes/token = {100 * per_token / full:.2f}% of full-vocabulary "
        f"float16 ({full} bytes/token)"
    )
    return path
