"""GPT-2's ``Conv1D`` rewritten as ``nn.Linear`` so torchao quantizes it, and the loader
for folders written from such a model.

transformers' ``Conv1D`` computes ``addmm(bias, x, W)`` with ``W`` stored (in, out). torchao
0.18's quantized tensors implement ``F.linear`` and ``embedding`` but no ``addmm``, so a
quantized Conv1D cannot run, and transformers' torchao loader only rebuilds quantized
``nn.Linear`` / ``nn.Embedding`` weights. Skipping Conv1D would leave every GPT-2 block in
float (what users report as "int8 silently skipped"). An ``nn.Linear`` holding ``W.T`` computes
the same function, so :func:`conv1d_to_linear` swaps the modules before quantizing and every
block weight is quantized like a llama one.

The price: ``from_pretrained`` rebuilds Conv1D modules and cannot place the (out, in)
quantized weights in them, so a folder written from a rewritten model lists the rewritten
modules under :data:`CONFIG_KEY` in its ``config.json`` and loads with
:func:`load_linearized` (transformers, torchao and safetensors only; no distill code runs
inside the model). :func:`load_causal_lm` picks that loader or plain ``from_pretrained``.

This module imports nothing from distill, so a process that must prove what plain libraries
load (the parity check's child) can use it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

CONFIG_KEY = "distill_conv1d_as_linear"


def conv1d_names(model: nn.Module) -> list[str]:
    from transformers.pytorch_utils import Conv1D

    return [name for name, module in model.named_modules() if isinstance(module, Conv1D)]


def conv1d_to_linear(model: nn.Module) -> list[str]:
    """Replace every transformers ``Conv1D`` of ``model`` by an equal ``nn.Linear``, in place.

    Returns:
        the dotted names of the replaced modules (empty for models without Conv1D).
    """
    names = conv1d_names(model)
    for name in names:
        old = model.get_submodule(name)
        weight = old.weight  # (in, out)
        new = nn.Linear(
            weight.shape[0],
            weight.shape[1],
            bias=old.bias is not None,
            device=weight.device,
            dtype=weight.dtype,
        )
        with torch.no_grad():
            new.weight.copy_(weight.t())
            if old.bias is not None:
                new.bias.copy_(old.bias)
        new.requires_grad_(weight.requires_grad)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    return names


def linearized_modules(folder: str | Path) -> list[str]:
    """The Conv1D modules a folder stores as Linear (:data:`CONFIG_KEY`), or ``[]``."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return []
    return list(json.loads(path.read_text()).get(CONFIG_KEY) or [])


def load_linearized(folder: str | Path, device: str | torch.device = "cpu") -> Any:
    """Load a folder written from a model whose Conv1D modules were made Linear.

    Builds the architecture from ``config.json``, makes the listed Conv1D modules Linear
    again, and assigns the stored tensors (torchao's flattened safetensors format is rebuilt
    into its tensor subclasses). Tied input/output embeddings are tied again.

    Raises:
        ValueError: the folder lists no rewritten modules, the model's Conv1D modules differ
            from the list, or stored and expected weights do not match one to one.
    """
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    expected = linearized_modules(folder)
    if not expected:
        raise ValueError(f"{folder}/config.json lists no {CONFIG_KEY}: use from_pretrained")
    config = AutoConfig.from_pretrained(folder)
    # The quantization config describes the stored tensors; from_config must not act on it.
    config.__dict__.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(config, dtype=config.dtype or torch.float32)
    converted = conv1d_to_linear(model)
    if sorted(converted) != sorted(expected):
        raise ValueError(
            f"{folder}: config lists {sorted(expected)} as rewritten Conv1D modules but the "
            f"architecture has {sorted(converted)}"
        )
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{folder} holds no .safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open API)
            metadata = f.metadata() or {}
        if "tensor_names" in metadata:  # torchao's flattened subclasses
            from torchao.prototype.safetensors.safetensors_support import (
                unflatten_tensor_state_dict,
            )

            rebuilt, leftover = unflatten_tensor_state_dict(tensors, metadata)
            state.update(rebuilt)
            state.update(leftover)
        else:
            state.update(tensors)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    out_emb = model.get_output_embeddings()
    if tied and out_emb is not None:
        out_emb.weight = model.get_input_embeddings().weight
        head = next(n for n, m in model.named_modules() if m is out_emb)
        missing = [k for k in missing if k != f"{head}.weight"]
    if missing or unexpected:
        raise ValueError(
            f"{folder}: stored weights do not match the model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    if torch.device(device) != torch.device("cpu"):
        # Only when it must move: torchao 0.18's unpacked int4 tensor widens its fp16 scales
        # to fp32 on any .to(), even to the device it is on.
        model = model.to(device)
    return model.eval()


def load_causal_lm(folder: str | Path, **kwargs: Any) -> Any:
    """``AutoModelForCausalLM.from_pretrained(folder, **kwargs)``, or :func:`load_linearized`
    for folders that store Conv1D modules as Linear (``device_map`` honoured as the device)."""
    from transformers import AutoModelForCausalLM

    if kwargs.get("gguf_file") is None and linearized_modules(folder):
        return load_linearized(folder, device=kwargs.get("device_map") or "cpu")
    return AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
