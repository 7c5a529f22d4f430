"""Post-training weight quantization of the distilled student with torchao.

The output folder is an ordinary Hugging Face model folder: ``config.json`` records a
``TorchAoConfig`` and ``model.safetensors`` holds torchao's flattened int8 tensors, so plain
``AutoModelForCausalLM.from_pretrained(folder)`` reloads it (torchao installed, no ``distill``).

Why the weights are quantized here and written by hand instead of through
``from_pretrained(src, quantization_config=TorchAoConfig(...))`` + ``save_pretrained``
(transformers 5.23, torchao 0.18):

* transformers' on-load quantizer calls ``quantize_`` with torchao's default ``_is_linear``
  filter, so ``include_input_output_embeddings=True`` alone leaves ``nn.Embedding`` in float;
* with tied embeddings, ``save_pretrained`` looks for aliases among the *flattened* names
  (``lm_head._weight_qdata``), which its tied-key patterns (``lm_head.weight``) do not match,
  so it writes the int8 table twice, and the reload then fails in ``tie_weights`` because
  ``torch.equal`` is not implemented for torchao tensors.

Here each shared weight is quantized once, every alias is pointed back at the quantized
tensor, and only the first name of each alias group is written; transformers re-ties the
others on load from ``tie_word_embeddings``. Every linear-like module is either quantized or
reported in ``skipped_modules`` with the reason.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill.config import QUANT_METHODS, DistillError, PipelineConfig
from distill.footprint import disk_bytes, weight_bytes

log = logging.getLogger(__name__)

# Weight files are rewritten; every other plain file in the source folder (tokenizer,
# generation config, chat template, README) is copied unchanged.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


class QuantizeError(DistillError):
    """The quantize stage cannot run on the given folder or method."""


def _int8_weight_only() -> Any:
    # Int8Tensor: symmetric per-output-row int8 with one float scale per row. torchao's
    # Int8WeightOnlyConfig and IntxWeightOnlyConfig(weight_dtype=torch.int8) both reload in
    # transformers and gave the same perplexity on the student; Int8Tensor stores no zero
    # point (the intx tensor keeps an int8 one per row). set_inductor_config=False: we do not
    # compile here, and it would change torch._inductor's global config as a side effect.
    from torchao.quantization import Int8WeightOnlyConfig

    return Int8WeightOnlyConfig(set_inductor_config=False)


_AO_CONFIGS: dict[str, Callable[[], Any]] = {"int8_weight_only": _int8_weight_only}
assert set(_AO_CONFIGS) == set(QUANT_METHODS), "config.QUANT_METHODS and _AO_CONFIGS disagree"


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
    # Patterns name whole dotted segments ("lm_head", "mlp.gate"), never a prefix of one.
    if any(f".{k}." in f".{name}." for k in keep_fp32):
        return "listed in the model's _keep_in_fp32_modules"
    if isinstance(module, Conv1D):
        # Conv1D runs torch.addmm(bias, x, weight) on an (in, out) weight, and torchao's int8
        # tensors implement F.linear and F.embedding but not addmm: a quantized Conv1D would
        # fail on the first forward. Swapping it for nn.Linear would not survive a plain
        # from_pretrained, which rebuilds Conv1D modules.
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


def _unique_state_dict(model: nn.Module, plan: QuantPlan) -> dict[str, torch.Tensor]:
    """The state dict without alias entries: safetensors cannot store one tensor twice."""
    state = model.state_dict()
    for alias in plan.aliases:
        state.pop(f"{alias}.weight", None)
    return state


def _write_folder(
    model: nn.Module, plan: QuantPlan, src: Path, staging: Path, quant_config: Any
) -> None:
    """Write config, flattened safetensors and the source's non-weight files to ``staging``."""
    from safetensors.torch import save_file
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    staging.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        if not f.is_file() or f.name == "config.json" or f.name in _WEIGHT_INDEXES:
            continue
        if f.name.endswith(_WEIGHT_SUFFIXES):
            continue
        shutil.copy2(f, staging / f.name)
    tensors, metadata = flatten_tensor_state_dict(_unique_state_dict(model, plan))
    # transformers reads "format" to pick the framework, and the torchao keys to rebuild
    # the int8 tensors on load.
    metadata["format"] = "pt"
    save_file(
        {k: v.contiguous() for k, v in tensors.items()}, staging / "model.safetensors", metadata
    )
    model.config.quantization_config = quant_config
    model.config.save_pretrained(staging)


def _publish(staging: Path, dst: Path) -> None:
    """Move the finished ``staging`` folder to ``dst``, replacing an older ``dst`` whole.

    A directory cannot be renamed over a non-empty one, so the old copy is moved aside first;
    readers see either the old folder or the new one, never a half-written mix.
    """
    old = dst.parent / f".{dst.name}.old-{os.getpid()}"
    if dst.exists():
        os.replace(dst, old)
    os.replace(staging, dst)
    shutil.rmtree(old, ignore_errors=True)


def _tied(model: nn.Module) -> bool:
    """Whether the input embedding and the LM head hold the very same tensor object."""
    emb_in = model.get_input_embeddings()
    emb_out = model.get_output_embeddings()
    return emb_in is not None and emb_out is not None and emb_in.weight is emb_out.weight


def quantize_folder(src: Path, dst: Path, method: str, *, include_embeddings: bool) -> dict:
    """Quantize the causal LM in ``src`` and write a folder plain transformers reloads.

    The folder is built in a hidden staging directory next to ``dst`` and renamed into place,
    then reloaded with ``AutoModelForCausalLM.from_pretrained`` to measure what a user gets.

    Args:
        src: Hugging Face model folder (config, safetensors, tokenizer files).
        dst: output folder; replaced if it exists.
        method: one of ``config.QUANT_METHODS``.
        include_embeddings: also quantize the input embedding and the (tied) LM head.

    Returns:
        ``method``, ``src``, ``dst``, ``quant_type`` (torchao config class),
        ``include_embeddings``, ``quantized_modules`` (names), ``tied_modules``
        (alias -> owner), ``skipped_modules`` (``{"name", "class", "reason"}``),
        ``float_weight_bytes``, ``weight_bytes`` (of the reloaded model, via
        :func:`distill.footprint.weight_bytes`), ``weight_bytes_ratio``, ``float_disk_bytes``,
        ``disk_bytes``, ``tied_embeddings`` (the reloaded embedding and LM head share one
        tensor) and ``seconds``.

    Raises:
        QuantizeError: unknown method, ``src`` is not a model folder, or the reloaded model
            lost a weight tie (which would store a tied weight twice).
    """
    from transformers import AutoModelForCausalLM, TorchAoConfig

    if method not in _AO_CONFIGS:
        raise QuantizeError(
            f"unknown quant method {method!r}: choose from {', '.join(QUANT_METHODS)}"
        )
    src, dst = Path(src), Path(dst)
    if not (src / "config.json").is_file():
        raise QuantizeError(f"{src} has no config.json: give a Hugging Face model folder")
    start = time.perf_counter()

    # dtype="auto" keeps the stored dtype, so scales come out in the model's own precision.
    model = AutoModelForCausalLM.from_pretrained(src, dtype="auto")
    model.eval()
    float_bytes = weight_bytes(model)
    was_tied = _tied(model)
    plan = plan_quantization(model, include_embeddings=include_embeddings)
    ao_config = _AO_CONFIGS[method]()
    _apply_plan(model, plan, ao_config)
    quant_config = TorchAoConfig(
        ao_config,
        modules_to_not_convert=[s["name"] for s in plan.skipped] or None,
        include_input_output_embeddings=include_embeddings,
    )

    dst.parent.mkdir(parents=True, exist_ok=True)
    staging = dst.parent / f".{dst.name}.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        _write_folder(model, plan, src, staging, quant_config)
        _publish(staging, dst)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    del model

    reloaded = AutoModelForCausalLM.from_pretrained(dst)
    for alias, owner in plan.aliases.items():
        if reloaded.get_submodule(alias).weight is not reloaded.get_submodule(owner).weight:
            raise QuantizeError(
                f"{dst}: {alias} no longer shares {owner}'s weight after reload; the tie would "
                "store it twice. Check tie_word_embeddings in the source config.json"
            )
    tied = _tied(reloaded)
    if was_tied and not tied:
        raise QuantizeError(f"{dst}: input embedding and LM head came back untied")
    q_bytes = weight_bytes(reloaded)
    # An alias of a quantized weight (the tied LM head) computes with the int8 tensor too.
    quantized = plan.quantize + [a for a, o in plan.aliases.items() if o in plan.quantize]
    return {
        "method": method,
        "src": str(src),
        "dst": str(dst),
        "quant_type": type(ao_config).__name__,
        "include_embeddings": include_embeddings,
        "quantized_modules": quantized,
        "tied_modules": dict(plan.aliases),
        "skipped_modules": plan.skipped,
        "float_weight_bytes": float_bytes,
        "weight_bytes": q_bytes,
        "weight_bytes_ratio": q_bytes / float_bytes,
        "float_disk_bytes": disk_bytes(src),
        "disk_bytes": disk_bytes(dst),
        "tied_embeddings": tied,
        "seconds": round(time.perf_counter() - start, 2),
    }


def run(cfg: PipelineConfig, run_dir: Path) -> list[dict]:
    """Quantize ``run_dir/final`` with every method in ``cfg.quant.methods``.

    Writes ``run_dir/quantized/<method>/`` per method and ``run_dir/quantized/quantize.json``
    holding the list of :func:`quantize_folder` results.

    Raises:
        QuantizeError: ``run_dir/final`` does not exist, or a method fails as described in
            :func:`quantize_folder`.
    """
    run_dir = Path(run_dir)
    final = run_dir / "final"
    if not (final / "config.json").is_file():
        raise QuantizeError(
            f"{final} holds no trained model: run scripts/distill.py first, or set run_dir to a "
            "finished run"
        )
    out = run_dir / "quantized"
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for i, method in enumerate(cfg.quant.methods, 1):
        log.info("quantize %d/%d: %s on %s", i, len(cfg.quant.methods), method, final)
        result = quantize_folder(
            final, out / method, method, include_embeddings=cfg.quant.include_embeddings
        )
        log.info(
            "quantize %s: %.1f MB -> %.1f MB of weights (%.1f%%), %d modules quantized, "
            "%d skipped, %.1f s",
            method,
            result["float_weight_bytes"] / 1e6,
            result["weight_bytes"] / 1e6,
            100 * result["weight_bytes_ratio"],
            len(result["quantized_modules"]),
            len(result["skipped_modules"]),
            result["seconds"],
        )
        by_reason: dict[str, list[str]] = {}
        for skipped in result["skipped_modules"]:
            by_reason.setdefault(skipped["reason"], []).append(skipped["name"])
        for reason, names in by_reason.items():
            log.info("  kept in float: %d module(s), e.g. %s: %s", len(names), names[0], reason)
        results.append(result)
    # Written whole and renamed, so a crash never leaves a truncated summary.
    tmp = out / "quantize.json.tmp"
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, out / "quantize.json")
    return results
