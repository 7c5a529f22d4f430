"""The greedy layer-removal trajectory of a teacher, searched once and kept on disk.

``pair.student.num_layers=K`` (without ``layers``) keeps the K layers that
:func:`distill.models.layer_search.greedy_layer_drop` measures to matter most. Greedy removal
from L layers to K passes through every depth in between, and its next step depends only on
the layers still kept, so one trajectory serves every depth: a sweep over depths searches
once down to its smallest K; a later, smaller K continues the stored trajectory from its last
entry instead of starting again. Measured on the default teacher (SmolLM2-135M, 30 layers,
4 train blocks of 256 tokens, 2 shared CPU cores): see the pair file's header.

The file is keyed by what decides the result: the teacher's weights, the calibration blocks
(the run's first :data:`SEARCH_CALIB_BLOCKS` training blocks, so its tokenizer and data
settings too) and the batch size, and it is replaced atomically, so concurrent runs read a
complete trajectory or none.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill.data import blocks_hash
from distill.models.footprint import weights_hash
from distill.models.layer_search import greedy_layer_drop
from distill.run_dir import write_json_atomic

log = logging.getLogger(__name__)

# The settings the default pair file's layer list was measured with (scripts/select_layers.py
# --calib-blocks 4): 4 train blocks, scored one per forward so a losing candidate is abandoned
# after its first block.
SEARCH_CALIB_BLOCKS = 4
SEARCH_BATCH_SIZE = 1
# Bump when the search or the file layout changes, so old files are not read.
_FORMAT = 1


def trajectory_path(
    cache_dir: Path, teacher_key: str, calib_blocks: torch.Tensor, batch_size: int
) -> Path:
    """``cache_dir/layer_search/<key>.json`` for this teacher (its weights hash
    ``teacher_key``), these blocks and batch size."""
    payload = json.dumps([_FORMAT, teacher_key, blocks_hash(calib_blocks), int(batch_size)])
    key = hashlib.sha256(payload.encode()).hexdigest()[:16]
    return Path(cache_dir) / "layer_search" / f"{key}.json"


def _read(path: Path) -> list[dict[str, Any]] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # absent, or unreadable: search again and rewrite it
    trajectory = data.get("trajectory") if isinstance(data, dict) else None
    return trajectory if isinstance(trajectory, list) and trajectory else None


def greedy_trajectory(
    teacher: nn.Module,
    calib_blocks: torch.Tensor,
    num_layers: int,
    cache_dir: Path,
    *,
    teacher_key: str | None = None,
    batch_size: int = SEARCH_BATCH_SIZE,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """The greedy trajectory of ``teacher`` down to at least ``num_layers`` layers, cached.

    Args:
        teacher: the model whose decoder layers are removed (left unchanged).
        calib_blocks: ``(N, T)`` train-split token ids the removals are scored on.
        num_layers: the depth wanted; the trajectory returned reaches it (or went deeper).
        cache_dir: root of the shared cache (``distill.caches.cache_root``).
        teacher_key: the teacher's weights hash when the caller has it (hashed here if None).

    Returns:
        Entries as :func:`distill.models.layer_search.greedy_layer_drop` returns them, from
        the full teacher down to ``num_layers`` layers or fewer.

    Raises:
        LayerSearchError, ModelError: as :func:`greedy_layer_drop`.
    """
    key = teacher_key or weights_hash(teacher)
    path = trajectory_path(cache_dir, key, calib_blocks, batch_size)
    stored = _read(path)
    if stored is not None and stored[-1]["num_layers"] <= num_layers:
        log.info("layer search: %d layers read from %s", num_layers, path)
        return stored
    start = time.perf_counter()
    more = greedy_layer_drop(
        teacher,
        calib_blocks,
        num_layers,
        batch_size=batch_size,
        progress=progress,
        start=None if stored is None else stored[-1],
    )
    trajectory = more if stored is None else stored + more[1:]
    seconds = time.perf_counter() - start
    log.info(
        "layer search: greedy removal %d -> %d layers on %d train blocks, %.0f s (cached in %s)",
        trajectory[0]["num_layers"] if stored is None else stored[-1]["num_layers"],
        num_layers,
        calib_blocks.shape[0],
        seconds,
        path,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    # A run that shares cache_dir may have searched deeper meanwhile: keep the longer path
    # (both start from the same teacher and blocks, so one is a prefix of the other).
    now = _read(path)
    if now is None or now[-1]["num_layers"] > trajectory[-1]["num_layers"]:
        write_json_atomic(path, {"trajectory": trajectory, "calib_shape": list(calib_blocks.shape)})
    return trajectory


def greedy_layers(
    teacher: nn.Module,
    train_blocks: torch.Tensor,
    num_layers: int,
    cache_dir: Path,
    teacher_key: str | None = None,
) -> list[int]:
    """The ``num_layers`` teacher layers greedy removal keeps, scored on the first
    :data:`SEARCH_CALIB_BLOCKS` of ``train_blocks`` ``(N, T)``; searched at most once per
    teacher and data (see the module docstring)."""
    calib = train_blocks[:SEARCH_CALIB_BLOCKS]
    trajectory = greedy_trajectory(teacher, calib, num_layers, cache_dir, teacher_key=teacher_key)
    (entry,) = [e for e in trajectory if e["num_layers"] == num_layers]
    return list(entry["layers"])
