"""Crash-safe checkpoints: staged, marked complete last, renamed into place.

A checkpoint folder ``checkpoints/step-000200/`` holds the student (safetensors, via
``save_pretrained``), ``optimizer.pt`` (tensors only; read back with ``weights_only=True``),
``rng.safetensors`` + ``rng.json`` (torch, CUDA, numpy and python generators) and
``trainer_state.json``. It is written into ``.staging-step-000200-<pid>`` beside the target,
``COMPLETE`` is written last, and only then is the folder renamed into place: a crash at any
moment leaves either the previous checkpoints untouched or a staging folder that nothing
reads. The learning rate and data order are pure functions of the step, so the step is all
the scheduler and sampler need.

Under FSDP2 (accelerate's FSDP plugin with ``fsdp_version: 2``) the student's parameters and
optimizer state are shards on every rank. There a checkpoint is the *full* state, gathered
to rank 0 through ``torch.distributed.checkpoint.state_dict`` (what accelerate uses for
FSDP2 too): the same ``model.safetensors`` that ``from_pretrained`` reads, and an
``optimizer.pt`` keyed by parameter name instead of position. Full rather than sharded, so a
checkpoint stays one folder of ordinary files that any process count, and a run without
FSDP, can resume from; the price is one whole copy of the student's state in rank 0's CPU
memory while saving, and in each rank's while loading.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from distill.errors import DistillError
from distill.run_dir import replace_folder, staging_folder

MARKER = "COMPLETE"
STEP_PREFIX = "step-"


class CheckpointError(DistillError):
    """A checkpoint is missing, incomplete or lacks a piece resume needs."""


@dataclass
class TrainerState:
    """Where a run stands: ``trainer_state.json`` of each checkpoint."""

    step: int
    tokens_seen: int
    # distill.train.run_state.config_fingerprint of the run's config on num_processes processes.
    config_fingerprint: str
    # Processes that trained it (checkpoints from before this field was added: one).
    num_processes: int = 1


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:06d}"


def capture_rng() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every generator's state: tensors for safetensors, the rest JSON-serialisable."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    meta = {
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "python": [py_version, list(py_state), py_gauss],
    }
    return tensors, meta


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
        if states:
            torch.cuda.set_rng_state_all(states)
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    py_version, py_state, py_gauss = meta["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))


def is_sharded(model: Any) -> bool:
    """``model`` holds FSDP2 shards (``fully_shard``, as accelerate's FSDP2 plugin applies)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _full_state_options(**kwargs: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kwargs)


def full_model_state(model: Any) -> dict[str, torch.Tensor] | None:
    """The weights as whole tensors for ``save_pretrained(state_dict=...)``.

    Under FSDP2 a collective (every rank calls it): rank 0 receives them on CPU, the others
    an empty dict. Otherwise None, meaning "the model's own state dict".
    """
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full_state_options())


def save_checkpoint(
    checkpoints_dir: Path,
    *,
    model: Any,
    optimizer: torch.optim.Optimizer,
    state: TrainerState,
    keep_last_n: int,
    is_main: bool = True,
) -> Path:
    """Write a complete checkpoint for ``state.step`` atomically; prune old ones.

    Every process calls it: under FSDP2 gathering the full state is a collective; the
    main process (``is_main``) alone writes.

    Returns:
        The final folder path.
    """
    name = step_dir_name(state.step)
    target = checkpoints_dir / name
    weights, optim_state = None, None
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import get_state_dict

        weights, optim_state = get_state_dict(model, optimizer, options=_full_state_options())
    if not is_main:
        return target
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    staging = staging_folder(target)
    staging.mkdir()
    model.save_pretrained(str(staging), safe_serialization=True, state_dict=weights)
    torch.save(
        optimizer.state_dict() if optim_state is None else optim_state, staging / "optimizer.pt"
    )
    rng_tensors, rng_meta = capture_rng()
    save_file(rng_tensors, str(staging / "rng.safetensors"))
    (staging / "rng.json").write_text(json.dumps(rng_meta))
    (staging / "trainer_state.json").write_text(json.dumps(state.__dict__, indent=2))
    _fsync_dir(staging)
    (staging / MARKER).write_text("ok\n")  # written last: its presence means "complete"
    # Re-saving the same step (e.g. after resume) replaces the older copy whole.
    replace_folder(staging, target)
    prune_checkpoints(checkpoints_dir, keep_last_n)
    return target


def _fsync_dir(folder: Path) -> None:
    for f in folder.iterdir():
        if f.is_file():
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())


def complete_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first; staging and unmarked folders are skipped."""
    if not checkpoints_dir.is_dir():
        return []
    found = []
    for d in checkpoints_dir.iterdir():
        if d.is_dir() and d.name.startswith(STEP_PREFIX) and (d / MARKER).exists():
            try:
                found.append((int(d.name[len(STEP_PREFIX) :]), d))
            except ValueError:
                continue
    return [d for _, d in sorted(found)]


def prune_checkpoints(checkpoints_dir: Path, keep_last_n: int) -> None:
    """Delete all but the newest ``keep_last_n`` complete checkpoints (never the newest)."""
    keep = max(1, keep_last_n)
    for d in complete_checkpoints(checkpoints_dir)[:-keep]:
        shutil.rmtree(d, ignore_errors=True)


def resolve_resume(resume: str | None, checkpoints_dir: Path) -> Path | None:
    """``auto``: the newest complete checkpoint or None; a path: that checkpoint, checked.

    Raises:
        CheckpointError: an explicit path that is not a complete checkpoint.
    """
    if resume is None:
        return None
    if resume == "auto":
        found = complete_checkpoints(checkpoints_dir)
        return found[-1] if found else None
    path = Path(resume).expanduser()
    if not (path / MARKER).exists():
        raise CheckpointError(
            f"train.resume={resume}: not a complete checkpoint (no {MARKER} marker); "
            f"use train.resume=auto to pick the newest complete one"
        )
    return path


def load_checkpoint(path: Path, *, model: Any, optimizer: torch.optim.Optimizer) -> TrainerState:
    """Restore weights, optimizer and RNG state in place; return the trainer state.

    Raises:
        CheckpointError: naming any missing piece; resume never continues half-restored.
    """
    needed = [
        "model.safetensors",
        "optimizer.pt",
        "rng.safetensors",
        "rng.json",
        "trainer_state.json",
    ]
    missing = [n for n in needed if not (path / n).exists()]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} lacks {', '.join(missing)}: cannot resume exactly"
        )
    weights = load_file(str(path / "model.safetensors"))
    # Tied weights are stored once; load non-strictly, then check nothing real is missing.
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        # Each rank keeps its own shard of the whole tensors.
        result = set_model_state_dict(model, weights, options=_full_state_options(strict=False))
    else:
        result = model.load_state_dict(weights, strict=False)
    tied = {k for k in result.missing_keys if "lm_head" in k}
    if set(result.missing_keys) - tied or result.unexpected_keys:
        raise CheckpointError(
            f"checkpoint {path} does not match the model: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    _load_optimizer(path, model, optimizer)
    restore_rng(
        load_file(str(path / "rng.safetensors")), json.loads((path / "rng.json").read_text())
    )
    return read_trainer_state(path)


def _load_optimizer(path: Path, model: Any, optimizer: torch.optim.Optimizer) -> None:
    """Restore ``optimizer.pt``: keyed by parameter name (written under FSDP2; loads under
    any launch) or by position (``optimizer.state_dict()``; loads without FSDP only).

    Raises:
        CheckpointError: a positional one for a sharded model.
    """
    saved = torch.load(path / "optimizer.pt", weights_only=True)
    by_name = any(isinstance(k, str) for k in saved.get("state", {}))
    if by_name:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, saved, options=_full_state_options())
    elif is_sharded(model) and saved.get("state"):
        raise CheckpointError(
            f"checkpoint {path} holds an optimizer state keyed by position (a run without "
            "FSDP2): resume it without FSDP, or start this FSDP2 run in a new run dir"
        )
    else:
        optimizer.load_state_dict(saved)


def read_trainer_state(path: Path) -> TrainerState:
    """The trainer state of checkpoint ``path``, without loading anything else.

    Raises:
        CheckpointError: it has no readable ``trainer_state.json``.
    """
    try:
        return TrainerState(**json.loads((path / "trainer_state.json").read_text()))
    except (OSError, ValueError, TypeError) as err:
        raise CheckpointError(f"checkpoint {path}: unreadable trainer_state.json ({err})") from None
