"""Crash-safe checkpoints: staged, marked complete last, renamed into place.

A checkpoint folder ``checkpoints/step-000200/`` holds the student (safetensors, via
``save_pretrained``), ``optimizer.pt`` (tensors only; read back with ``weights_only=True``),
``rng.safetensors`` + ``rng.json`` (torch, CUDA, numpy and python generators) and
``trainer_state.json``. It is written into ``.staging-step-000200-<pid>`` beside the target,
``COMPLETE`` is written last, and only then is the folder renamed into place: a crash at any
moment leaves either the previous checkpoints untouched or a staging folder that nothing
reads. The learning rate and data order are pure functions of the step, so the step is all
the scheduler and sampler need.
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

from distill.config import DistillError
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
    # distill.train.loop.config_fingerprint of the run's config on num_processes processes.
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


def save_checkpoint(
    checkpoints_dir: Path,
    *,
    model: Any,
    optimizer: torch.optim.Optimizer,
    state: TrainerState,
    keep_last_n: int,
) -> Path:
    """Write a complete checkpoint for ``state.step`` atomically; prune old ones.

    Returns:
        The final folder path.
    """
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    name = step_dir_name(state.step)
    target = checkpoints_dir / name
    staging = staging_folder(target)
    staging.mkdir()
    model.save_pretrained(str(staging), safe_serialization=True)
    torch.save(optimizer.state_dict(), staging / "optimizer.pt")
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
    result = model.load_state_dict(weights, strict=False)
    tied = {k for k in result.missing_keys if "lm_head" in k}
    if set(result.missing_keys) - tied or result.unexpected_keys:
        raise CheckpointError(
            f"checkpoint {path} does not match the model: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    restore_rng(
        load_file(str(path / "rng.safetensors")), json.loads((path / "rng.json").read_text())
    )
    return read_trainer_state(path)


def read_trainer_state(path: Path) -> TrainerState:
    """The trainer state of checkpoint ``path``, without loading anything else.

    Raises:
        CheckpointError: it has no readable ``trainer_state.json``.
    """
    try:
        return TrainerState(**json.loads((path / "trainer_state.json").read_text()))
    except (OSError, ValueError, TypeError) as err:
        raise CheckpointError(f"checkpoint {path}: unreadable trainer_state.json ({err})") from None
