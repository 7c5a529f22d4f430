"""Which modules of a causal LM are quantized, and quantizing them in place.

Every linear-like module is either quantized or reported in ``skipped_modules`` with the
reason. A weight shared by several modules (tied input embedding and LM head) is quantized
once; every alias is pointed back at the quantized tensor, so the model keeps one copy.

GPT-2's ``Conv1D`` (``addmm`` on an (in, out) weight, which no torchao 0.18 tensor implements)
is rewritten as an equal ``nn.Linear`` before planning (:mod:`distill.models.conv1d`), so its
weights are quantized like a llama model's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from distill.models import CONFIG_KEY as CONV1D_CONFIG_KEY
from distill.models import conv1d_to_linear
from distill.quantize.gptq import Int4Groups, rtn_int4
from distill.quantize.torchao import (
    AO_CONFIGS,
    CAST,
    cast_weights,
    check_method,
    int4_tensor,
    int8_row_tensor,
)


@dataclass
class QuantPlan:
    """Which modules get an int8 weight, which share one, and which stay in float."""

    quantize: list[str] = field(default_factory=list)
    # alias module -> module whose (quantized or float) weight it shares.
    aliases: dict[str, str] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)


def _direct_weight(module: nn.Module) -> torch.Tensor | None:
    """The module's own 2-D ``weight`` parameter (not a child's), else None."""
    weight = module._parameters.get("weight")
    return weight if weight is not None and weight.dim() == 2 else None


def _skip_reason(
    name: str,
    module: nn.Module,
    *,
    is_embedding: bool,
    include_embeddings: bool,
    keep_fp32: list[str],
) -> str | None:
    """Why ``module`` keeps a float weight, or None when it is quantized."""
    from transformers.pytorch_utils import Conv1D

    if is_embedding and not include_embeddings:
        return "input/output embedding and quant.include_embeddings=false"
    if is_embedding and isinstance(module, nn.Embedding) and module._non_persistent_buffers_set:
        # Gemma's scaled embedding keeps sqrt(hidden) in a buffer the checkpoint does not store:
        # transformers' torchao loader leaves it uninitialized when the embedding is quantized
        # (a tiny Gemma 3 reloaded embed_scale 8.0 as -3791; tests/quantize/test_quantize.py).
        buffers = ", ".join(sorted(module._non_persistent_buffers_set))
        return (
            f"input embedding with an unsaved buffer ({buffers}) that transformers' torchao "
            "reload leaves uninitialized"
        )
    # Patterns name whole dotted segments ("lm_head", "mlp.gate"), never a prefix of one.
    if any(f".{k}." in f".{name}." for k in keep_fp32):
        return "listed in the model's _keep_in_fp32_modules"
    if isinstance(module, Conv1D):
        # quantize_model rewrites Conv1D as Linear first; a caller planning on an unconverted
        # model learns why it would stay in float.
        return "transformers Conv1D (torch.addmm on an (in, out) weight): no torchao int8 kernel"
    if isinstance(module, nn.Linear) or is_embedding:
        return None
    if isinstance(module, nn.Embedding):
        return "embedding other than the input/output embedding (e.g. positions)"
    return (
        f"{type(module).__name__} is neither nn.Linear nor the input embedding: torchao's int8 "
        "tensor only implements F.linear and F.embedding"
    )


def plan_quantization(model: nn.Module, *, include_embeddings: bool) -> QuantPlan:
    """Decide, for every module holding a 2-D weight, whether it is quantized.

    A weight shared by several modules (tied input embedding and LM head) is quantized once,
    under the first module that holds it; the others become aliases of it, so the model keeps
    one stored copy.

    Args:
        model: a causal LM, e.g. ``LlamaForCausalLM``; it is not modified.
        include_embeddings: quantize the input embedding and the output embedding (LM head).

    Returns:
        the plan; ``skipped`` entries are ``{"name", "class", "reason"}``.
    """
    embedding_ids = set()
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    for getter in (get_in, get_out):
        emb = getter() if getter is not None else None
        if emb is not None:
            embedding_ids.add(id(emb))
    keep_fp32 = list(getattr(model, "_keep_in_fp32_modules", None) or [])

    plan = QuantPlan()
    owner_of: dict[int, str] = {}
    decided: dict[str, str | None] = {}
    for name, module in model.named_modules():
        weight = _direct_weight(module)
        if weight is None:
            continue
        if id(weight) in owner_of:
            owner = owner_of[id(weight)]
            plan.aliases[name] = owner
            reason = decided[owner]
            if reason is not None:
                plan.skipped.append(
                    {
                        "name": name,
                        "class": type(module).__name__,
                        "reason": f"tied to {owner}: {reason}",
                    }
                )
            continue
        owner_of[id(weight)] = name
        reason = _skip_reason(
            name,
            module,
            is_embedding=id(module) in embedding_ids,
            include_embeddings=include_embeddings,
            keep_fp32=keep_fp32,
        )
        decided[name] = reason
        if reason is None:
            plan.quantize.append(name)
        else:
            plan.skipped.append({"name": name, "class": type(module).__name__, "reason": reason})
    return plan


def _apply_plan(model: nn.Module, plan: QuantPlan, ao_config: Any) -> None:
    """Quantize ``plan.quantize`` in place, then point every alias at its owner's new weight.

    ``quantize_`` replaces a module's Parameter, so without the re-tie an LM head tied to the
    embedding would keep the old float tensor and the model would hold both copies.
    """
    from torchao.quantization import quantize_

    chosen = set(plan.quantize)
    quantize_(model, ao_config, filter_fn=lambda _module, fqn: fqn in chosen)
    for alias, owner in plan.aliases.items():
        model.get_submodule(alias).weight = model.get_submodule(owner).weight


def is_tied(model: nn.Module) -> bool:
    """Whether the input embedding and the LM head hold the very same tensor object."""
    emb_in = model.get_input_embeddings()
    emb_out = model.get_output_embeddings()
    return emb_in is not None and emb_out is not None and emb_in.weight is emb_out.weight


def _skip_indivisible(model: nn.Module, plan: QuantPlan, group_size: int) -> None:
    """Move modules whose rows are not whole groups of ``group_size`` to ``plan.skipped``."""
    keep = []
    for name in plan.quantize:
        cols = model.get_submodule(name).weight.shape[-1]
        if cols % group_size:
            plan.skipped.append(
                {
                    "name": name,
                    "class": type(model.get_submodule(name)).__name__,
                    "reason": f"rows of {cols} values are not whole groups of "
                    f"quant.group_size={group_size}",
                }
            )
        else:
            keep.append(name)
    plan.quantize = keep


def quantize_model(
    model: nn.Module,
    method: str,
    *,
    include_embeddings: bool,
    group_size: int = 32,
    device: str = "cpu",
    calibrated: dict[str, Int4Groups] | None = None,
    embedding_bits: int = 8,
) -> tuple[QuantPlan, Any]:
    """Quantize (or cast) ``model`` in place with ``method``; tied weights stay one tensor.

    Args:
        model: a causal LM on ``device``.
        method: one of ``distill.names.QUANT_METHODS``.
        group_size: values per scale for ``int4_weight_only``.
        device: ``"cpu"`` or ``"cuda"``; picks the int4 tensor layout.
        calibrated: CPU ``int4_weight_only``: GPTQ groups per Linear name (others are RTN).
        embedding_bits: CPU ``int4_weight_only``: 8 stores the embedding as int8 per row.

    Returns:
        the plan (empty for casts) and the torchao config used (None for casts).

    Raises:
        QuantizeError: unknown method.
    """
    check_method(method)
    if method in CAST:
        cast_weights(model, CAST[method])
        return QuantPlan(), None
    linearized = conv1d_to_linear(model)
    if linearized:
        # Saved into config.json: the loader makes these Linear again (distill/models/conv1d.py).
        setattr(model.config, CONV1D_CONFIG_KEY, linearized)
    plan = plan_quantization(model, include_embeddings=include_embeddings)
    ao_config = AO_CONFIGS[method](group_size, device)
    if method == "int4_weight_only":
        _skip_indivisible(model, plan, group_size)
        _apply_int4(model, plan, ao_config, group_size, device, calibrated or {}, embedding_bits)
    else:
        _apply_plan(model, plan, ao_config)
    return plan, ao_config


def _apply_int4(
    model: nn.Module,
    plan: QuantPlan,
    ao_config: Any,
    group_size: int,
    device: str,
    calibrated: dict[str, Int4Groups],
    embedding_bits: int,
) -> None:
    """Give every planned module its int4 (or, for the embedding, int8) tensor; re-tie aliases.

    CPU: every Linear gets the unpacked int4 tensor (GPTQ groups where given), the embedding
    int4 or int8. CUDA: Linear weights get the packed tinygemm tensor; the embedding keeps the
    unpacked one, which alone implements embedding (a head tied to it computes with it too).
    """
    packed = set()
    if device == "cuda":
        from torchao.quantization import quantize_

        packed = {n for n in plan.quantize if isinstance(model.get_submodule(n), nn.Linear)}
        quantize_(model, ao_config, filter_fn=lambda _m, fqn: fqn in packed)
    for name in plan.quantize:
        if name in packed:
            continue
        module = model.get_submodule(name)
        if isinstance(module, nn.Embedding) and embedding_bits == 8:
            tensor = int8_row_tensor(module.weight)
        else:
            groups = calibrated.get(name) or rtn_int4(module.weight, group_size)
            tensor = int4_tensor(groups, module.weight.dtype)
        module.weight = nn.Parameter(tensor, requires_grad=False)
    for alias, owner in plan.aliases.items():
        model.get_submodule(alias).weight = model.get_submodule(owner).weight
