"""Bytes a model really holds, in memory and on disk.

``PreTrainedModel.get_memory_footprint()`` multiplies element counts by the *outer* dtype's
size, so a torchao int8 tensor (whose outer dtype is float32) is counted at four bytes per
weight. Here every tensor subclass is flattened into the plain tensors it stores, and tied
weights are counted once.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes stored by ``t``: the sum over its inner tensors for a wrapper subclass."""
    if isinstance(t, nn.Parameter):
        t = t.data
    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, name)) for name in names)
    return t.numel() * t.element_size()


def weight_bytes(model: nn.Module, include_buffers: bool = True) -> int:
    """Bytes of all parameters (and persistent buffers), each shared tensor counted once."""
    seen: set[int] = set()
    total = 0
    tensors = [p for _, p in model.named_parameters(remove_duplicate=False)]
    if include_buffers:
        names = {
            name
            for module in model.modules()
            for name in getattr(module, "_non_persistent_buffers_set", set())
        }
        tensors += [b for n, b in model.named_buffers() if n.rsplit(".", 1)[-1] not in names]
    for t in tensors:
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += tensor_bytes(t)
    return total


def param_count(model: nn.Module) -> int:
    """Number of distinct parameters (a tied embedding counted once), in logical elements."""
    return sum(p.numel() for p in model.parameters())


def disk_bytes(folder: str | Path, patterns: tuple[str, ...] = ("*.safetensors", "*.gguf")) -> int:
    """Total size of the weight files in ``folder`` (not recursive)."""
    folder = Path(folder)
    return sum(f.stat().st_size for pattern in patterns for f in folder.glob(pattern))


def weights_hash(model: torch.nn.Module) -> str:
    """sha256 (16 hex digits) of every tensor of ``model.state_dict()``: names, dtypes, bytes."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if hasattr(tensor, "full_tensor"):  # a DTensor shard of an FSDP-placed teacher
            tensor = tensor.full_tensor()
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]
