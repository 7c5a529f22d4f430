"""Post-training quantization of the distilled student: torchao variants and GGUF files.

Every variant is written, then reloaded in a fresh process and checked against the model it
was written from (:mod:`distill.quantize.parity`); a failed check stops the stage naming the artifact.

torchao variants (``quant.methods``) are ordinary Hugging Face folders: ``config.json``
records a ``TorchAoConfig`` and ``model.safetensors`` holds torchao's flattened tensors, so
plain ``AutoModelForCausalLM.from_pretrained(folder)`` reloads them (torchao installed, no
``distill``). What each method stores (torchao 0.18, bytes per weight of a 2-D weight):

* ``bf16`` / ``fp16``: every float tensor cast; 2 bytes per weight.
* ``int8_weight_only``: ``Int8Tensor``, int8 per output row with one fp32 scale per row;
  ~1 byte per weight on any device.
* ``int8_dynamic``: the same weights, plus per-token int8 activations at run time.
* ``int4_weight_only``: symmetric int4 groups of ``quant.group_size`` values (one fp16 scale
  per group, the Q4_0 grid), chosen by GPTQ on training blocks when ``quant.calibration=gptq``
  (:mod:`distill.quantize.gptq`), else rounded to nearest. CPU: ``IntxUnpackedToInt8Tensor``, the int4
  values stored *unpacked*, one per int8 byte (~1.06 bytes per weight at group 32); the
  embedding and tied head at ``quant.embedding_bits`` (8: int8 per row). CUDA:
  ``Int4TilePackedTo4dTensor``, two values per byte in tinygemm's tile layout, bf16 scales and
  zeros, uncalibrated (that folder reloads on CUDA only); the embedding stays the unpacked
  tensor, which alone implements ``embedding``.

On CPU torchao 0.18 has no packed int4 tensor that transformers can reload
(``Int4WeightOnlyConfig`` needs CUDA or the ``mslk`` package; the CPU ``Int4OpaqueTensor`` is a
prototype outside torchao's safetensors allow-list), so a CPU ``int4_weight_only`` folder is
no smaller than int8. The truly 4-bit CPU artifact is the GGUF ``q4_0`` file (4.5 bits per
weight; :mod:`distill.quantize.gguf`), which llama.cpp runs directly.

Why the torchao weights are quantized here and written by hand instead of through
``from_pretrained(src, quantization_config=TorchAoConfig(...))`` + ``save_pretrained``
(transformers 5.23):

* transformers' on-load quantizer calls ``quantize_`` with torchao's default ``_is_linear``
  filter, so ``include_input_output_embeddings=True`` alone leaves ``nn.Embedding`` in float;
* with tied embeddings, ``save_pretrained`` looks for aliases among the *flattened* names
  (``lm_head._weight_qdata``), which its tied-key patterns (``lm_head.weight``) do not match,
  so it writes the table twice, and the reload then fails in ``tie_weights`` because
  ``torch.equal`` is not implemented for torchao tensors.

Here each shared weight is quantized once, every alias is pointed back at the quantized
tensor, and only the first name of each alias group is written; transformers re-ties the
others on load from ``tie_word_embeddings``. Every linear-like module is either quantized or
reported in ``skipped_modules`` with the reason.

GPT-2's ``Conv1D`` (``addmm`` on an (in, out) weight, which no torchao 0.18 tensor implements)
is rewritten as an equal ``nn.Linear`` before quantizing (:mod:`distill.models.conv1d`), so its
weights are quantized like a llama model's. ``from_pretrained`` would rebuild Conv1D modules,
so such a folder lists the rewritten modules in ``config.json`` and loads with
:func:`distill.models.conv1d.load_causal_lm` (transformers + torchao + safetensors underneath); the
parity check reloads it that way in its fresh process, and the quantize record says
``loader: distill.models.conv1d.load_causal_lm``.
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

from distill.config import GGUF_TYPES, QUANT_METHODS, DistillError, PipelineConfig, cache_root
from distill.models.conv1d import CONFIG_KEY as CONV1D_CONFIG_KEY
from distill.models.conv1d import conv1d_to_linear, load_causal_lm
from distill.models.footprint import disk_bytes, weight_bytes
from distill.quantize.gptq import Int4Groups, rtn_int4

log = logging.getLogger(__name__)

# Weight files are rewritten; every other plain file in the source folder (tokenizer,
# generation config, chat template, README) is copied unchanged.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


class QuantizeError(DistillError):
    """The quantize stage cannot run on the given folder or method."""


def _int8_weight_only(group_size: int, device: str) -> Any:
    # Int8Tensor: symmetric per-output-row int8 with one float scale per row. torchao's
    # Int8WeightOnlyConfig and IntxWeightOnlyConfig(weight_dtype=torch.int8) both reload in
    # transformers and gave the same perplexity on the student; Int8Tensor stores no zero
    # point (the intx tensor keeps an int8 one per row). set_inductor_config=False: we do not
    # compile here, and it would change torch._inductor's global config as a side effect.
    from torchao.quantization import Int8WeightOnlyConfig

    return Int8WeightOnlyConfig(set_inductor_config=False)


def _int8_dynamic(group_size: int, device: str) -> Any:
    # The same per-row int8 weights; activations are quantized per token (symmetric) at run
    # time and the matmul runs int8 x int8 -> int32.
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig

    return Int8DynamicActivationInt8WeightConfig(set_inductor_config=False)


def _int4_weight_only(group_size: int, device: str) -> Any:
    from torchao.quantization import Int4WeightOnlyConfig

    if device == "cuda":
        # Packed two per byte for tinygemm's _weight_int4pack_mm (in torch itself, no mslk).
        return Int4WeightOnlyConfig(
            group_size=group_size,
            int4_packing_format="tile_packed_to_4d",
            set_inductor_config=False,
        )
    return _intx_int4(group_size)


def _intx_int4(group_size: int) -> Any:
    # What config.json records for the unpacked int4 tensors; the tensors themselves are
    # built by int4_tensor from RTN or GPTQ groups (distill/gptq.py).
    from torchao.quantization import IntxWeightOnlyConfig, MappingType, PerGroup

    return IntxWeightOnlyConfig(
        weight_dtype=torch.int4,
        granularity=PerGroup(group_size),
        mapping_type=MappingType.SYMMETRIC,
    )


def int4_tensor(groups: Int4Groups, dtype: torch.dtype) -> torch.Tensor:
    """torchao's unpacked int4 tensor (values one per int8, zero point 0) for ``groups``.

    Symmetric groups on the Q4_0 grid (:mod:`distill.quantize.gptq`): ``w = level * scale`` with
    ``level`` in [-8, 7]. It implements ``linear`` and ``embedding`` and reloads through
    transformers' ``TorchAoConfig``. (An earlier min/max grid with a float zero point per
    group, Q4_1's scheme, cost 4.8x perplexity on the trained student: it snaps weights back
    onto the teacher's own Q4_1 grid, undoing distillation.)
    """
    from torchao.quantization import IntxUnpackedToInt8Tensor

    rows, _ = groups.levels.shape
    return IntxUnpackedToInt8Tensor(
        qdata=groups.levels.contiguous(),
        scale=groups.scales.reshape(rows, -1),
        zero_point=torch.zeros_like(groups.scales).reshape(rows, -1),
        target_dtype=torch.int4,
        block_size=(1, groups.group_size),
        dtype=dtype,
        activation_quantization=None,
    )


def int8_row_tensor(weight: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 per row, as torchao's unpacked intx tensor (for an int4 model's embedding).

    At 4 bits the embedding, which is also the tied LM head, alone cost 1.12x perplexity on
    the default student; at 8 bits 1.002x (``quant.embedding_bits``).
    """
    from torchao.quantization import IntxUnpackedToInt8Tensor

    w = weight.detach().float()
    scale = (w.abs().amax(1, keepdim=True) / 127).clamp(min=torch.finfo(torch.float16).tiny)
    scale = scale.half()
    levels = torch.clamp(torch.round(w / scale.float()), -128, 127).to(torch.int8)
    return IntxUnpackedToInt8Tensor(
        qdata=levels,
        scale=scale,
        zero_point=torch.zeros_like(scale),
        target_dtype=torch.int8,
        block_size=(1, w.shape[1]),
        dtype=weight.dtype,
        activation_quantization=None,
    )


_CAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
_AO_CONFIGS: dict[str, Callable[[int, str], Any]] = {
    "int8_weight_only": _int8_weight_only,
    "int8_dynamic": _int8_dynamic,
    "int4_weight_only": _int4_weight_only,
}
assert set(_AO_CONFIGS) | set(_CAST) == set(QUANT_METHODS), "QUANT_METHODS and quantize disagree"

# What a method stores per device, written into quantize.json and the model card.
STORAGE = {
    ("bf16", "cpu"): "every float tensor in bfloat16",
    ("fp16", "cpu"): "every float tensor in float16",
    ("int8_weight_only", "cpu"): "int8 per output row + one float scale per row",
    ("int8_dynamic", "cpu"): "int8 per output row + one float scale per row; int8 activations",
    ("int4_weight_only", "cpu"): (
        "symmetric int4 groups stored unpacked, one per int8 byte, + fp16 scale (and a zero "
        "point of 0) per group; embedding int8 per row at quant.embedding_bits=8 (torchao 0.18 "
        "has no reloadable packed int4 tensor on CPU)"
    ),
    ("int4_weight_only", "cuda"): (
        "int4 packed two per byte (tinygemm tile layout) + bf16 scale and zero per group; "
        "embedding unpacked int4 in int8"
    ),
}


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


def _cast_weights(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast parameters and persistent buffers to ``dtype``, as a reload in ``dtype`` has them.

    ``model.to(dtype)`` would also cast non-persistent buffers such as RoPE's ``inv_freq``,
    which ``from_pretrained`` recomputes in fp32: the in-memory model would then compute
    something the saved folder never does.
    """
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if param.is_floating_point():
                param.data = param.data.to(dtype)
        persistent = set(module._buffers) - set(getattr(module, "_non_persistent_buffers_set", ()))
        for name in persistent:
            buf = module._buffers[name]
            if buf is not None and buf.is_floating_point():
                module._buffers[name] = buf.to(dtype)
    model.config.dtype = dtype


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
        method: one of ``config.QUANT_METHODS``.
        group_size: values per scale for ``int4_weight_only``.
        device: ``"cpu"`` or ``"cuda"``; picks the int4 tensor layout.
        calibrated: CPU ``int4_weight_only``: GPTQ groups per Linear name (others are RTN).
        embedding_bits: CPU ``int4_weight_only``: 8 stores the embedding as int8 per row.

    Returns:
        the plan (empty for casts) and the torchao config used (None for casts).

    Raises:
        QuantizeError: unknown method.
    """
    if method in _CAST:
        _cast_weights(model, _CAST[method])
        return QuantPlan(), None
    if method not in _AO_CONFIGS:
        raise QuantizeError(
            f"unknown quant method {method!r}: choose from {', '.join(QUANT_METHODS)}"
        )
    linearized = conv1d_to_linear(model)
    if linearized:
        # Saved into config.json: the loader makes these Linear again (distill/conv1d.py).
        setattr(model.config, CONV1D_CONFIG_KEY, linearized)
    plan = plan_quantization(model, include_embeddings=include_embeddings)
    if method == "int4_weight_only":
        _skip_indivisible(model, plan, group_size)
    ao_config = _AO_CONFIGS[method](group_size, device)
    if method == "int4_weight_only":
        # CPU: every Linear gets the unpacked int4 tensor (GPTQ groups where given), the
        # embedding int4 or int8. CUDA: Linear weights get the packed tinygemm tensor; the
        # embedding keeps the unpacked one, which alone implements embedding (a head tied to
        # it computes with it too).
        calibrated = calibrated or {}
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
    else:
        _apply_plan(model, plan, ao_config)
    return plan, ao_config


def default_device(method: str) -> str:
    """Where ``method`` is quantized by default: only int4 has a device-specific layout
    (packed for tinygemm on CUDA); everything else is quantized on the CPU."""
    return "cuda" if method == "int4_weight_only" and torch.cuda.is_available() else "cpu"


def quantize_to_folder(
    src: Path,
    dst: Path,
    method: str,
    *,
    include_embeddings: bool,
    group_size: int = 32,
    device: str | None = None,
    calibrated: dict[str, Int4Groups] | None = None,
    embedding_bits: int = 8,
    compute_dtype: str = "float32",
) -> tuple[dict, nn.Module]:
    """:func:`quantize_folder`, also returning the in-memory model the folder was written from.

    ``compute_dtype="bfloat16"`` casts the float tensors of a torchao variant quantized on
    the CPU to bf16 first (``quant.compute_dtype``), so it reloads and computes in bf16.
    """
    from transformers import AutoModelForCausalLM, TorchAoConfig

    if method not in QUANT_METHODS:
        raise QuantizeError(
            f"unknown quant method {method!r}: choose from {', '.join(QUANT_METHODS)}"
        )
    src, dst = Path(src), Path(dst)
    if not (src / "config.json").is_file():
        raise QuantizeError(f"{src} has no config.json: give a Hugging Face model folder")
    if device is None:
        device = default_device(method)
    start = time.perf_counter()

    # dtype="auto" keeps the stored dtype, so scales come out in the model's own precision.
    model = AutoModelForCausalLM.from_pretrained(src, dtype="auto")
    model.eval()
    float_bytes = weight_bytes(model)
    params = sum(p.numel() for p in model.parameters())
    was_tied = _tied(model)
    if device == "cuda":
        # tinygemm's int4 kernel takes bf16 activations and scales; config.dtype follows, so
        # the reload computes in bf16 too.
        model.to("cuda")
        _cast_weights(model, torch.bfloat16)
    elif method in _AO_CONFIGS and compute_dtype == "bfloat16":
        _cast_weights(model, torch.bfloat16)
    plan, ao_config = quantize_model(
        model,
        method,
        include_embeddings=include_embeddings,
        group_size=group_size,
        device=device,
        calibrated=calibrated,
        embedding_bits=embedding_bits,
    )

    dst.parent.mkdir(parents=True, exist_ok=True)
    staging = dst.parent / f".{dst.name}.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        if ao_config is None:
            model.save_pretrained(str(staging))
            for f in sorted(src.iterdir()):
                if f.is_file() and not (staging / f.name).exists():
                    if not f.name.endswith(_WEIGHT_SUFFIXES) and f.name not in _WEIGHT_INDEXES:
                        shutil.copy2(f, staging / f.name)
        else:
            quant_config = TorchAoConfig(
                ao_config,
                modules_to_not_convert=[s["name"] for s in plan.skipped] or None,
                include_input_output_embeddings=include_embeddings,
            )
            _write_folder(model, plan, src, staging, quant_config)
        _publish(staging, dst)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    load_kwargs: dict[str, Any] = {"device_map": device} if device != "cpu" else {}
    reloaded = load_causal_lm(dst, **load_kwargs)
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
    del reloaded
    # An alias of a quantized weight (the tied LM head) computes with the quantized tensor too.
    quantized = plan.quantize + [a for a, o in plan.aliases.items() if o in plan.quantize]
    int4_cpu = method == "int4_weight_only" and device == "cpu"
    record = {
        "method": method,
        "format": "torchao" if ao_config is not None else "safetensors",
        "src": str(src),
        "dst": str(dst),
        "quant_type": type(ao_config).__name__ if ao_config is not None else str(_CAST[method]),
        "device": device,
        "compute_dtype": str(model.dtype).removeprefix("torch."),
        "storage": STORAGE.get((method, device), STORAGE.get((method, "cpu"), "")),
        "group_size": group_size if method == "int4_weight_only" else None,
        "calibration": (("gptq" if calibrated else "rtn") if int4_cpu else None),
        "embedding_bits": embedding_bits if int4_cpu and include_embeddings else None,
        "include_embeddings": include_embeddings,
        "quantized_modules": quantized,
        "tied_modules": dict(plan.aliases),
        "skipped_modules": plan.skipped,
        "params": params,
        "float_weight_bytes": float_bytes,
        "weight_bytes": q_bytes,
        "weight_bytes_ratio": q_bytes / float_bytes,
        "bits_per_weight": q_bytes * 8 / params,
        "float_disk_bytes": disk_bytes(src),
        "disk_bytes": disk_bytes(dst),
        "tied_embeddings": tied,
        # Folders with Conv1D stored as Linear need distill's loader (module docstring).
        "loader": "distill.models.conv1d.load_causal_lm"
        if getattr(model.config, CONV1D_CONFIG_KEY, None)
        else "transformers.AutoModelForCausalLM.from_pretrained",
        "seconds": round(time.perf_counter() - start, 2),
    }
    return record, model


def quantize_folder(
    src: Path,
    dst: Path,
    method: str,
    *,
    include_embeddings: bool,
    group_size: int = 32,
    device: str | None = None,
    compute_dtype: str = "float32",
) -> dict:
    """Quantize the causal LM in ``src`` and write a folder plain transformers reloads.

    The folder is built in a hidden staging directory next to ``dst`` and renamed into place,
    then reloaded with ``AutoModelForCausalLM.from_pretrained`` to measure what a user gets.

    Args:
        src: Hugging Face model folder (config, safetensors, tokenizer files).
        dst: output folder; replaced if it exists.
        method: one of ``config.QUANT_METHODS``.
        include_embeddings: also quantize the input embedding and the (tied) LM head.
        group_size: values per scale and zero point for ``int4_weight_only``.
        device: where to quantize; default CUDA for int4 when available (packed layout, that
            folder then reloads on CUDA only), else CPU.
        compute_dtype: ``"bfloat16"`` casts a CPU torchao variant's float tensors to bf16
            first (``quant.compute_dtype``); ``"float32"`` keeps them.

    Returns:
        ``method``, ``format`` (``torchao`` or ``safetensors`` for casts), ``src``, ``dst``,
        ``quant_type`` (torchao config class or dtype), ``device``, ``storage`` (what the
        bytes are), ``group_size``, ``include_embeddings``, ``quantized_modules`` (names),
        ``tied_modules`` (alias -> owner), ``skipped_modules`` (``{"name", "class",
        "reason"}``), ``params``, ``float_weight_bytes``, ``weight_bytes`` (of the reloaded
        model, via :func:`distill.models.footprint.weight_bytes`), ``weight_bytes_ratio``,
        ``bits_per_weight`` (weight bytes x 8 / parameters), ``float_disk_bytes``,
        ``disk_bytes``, ``tied_embeddings`` (the reloaded embedding and LM head share one
        tensor) and ``seconds``.

    Raises:
        QuantizeError: unknown method, ``src`` is not a model folder, or the reloaded model
            lost a weight tie (which would store a tied weight twice).
    """
    record, _ = quantize_to_folder(
        src,
        dst,
        method,
        include_embeddings=include_embeddings,
        group_size=group_size,
        device=device,
        compute_dtype=compute_dtype,
    )
    return record


def gguf_record(export: Any, float_bytes: int, include_embeddings: bool, seconds: float) -> dict:
    """The quantize.json entry of one GGUF file written by :func:`export_gguf`."""
    counts: dict[str, int] = {}
    for kind in export.tensor_types.values():
        counts[kind] = counts.get(kind, 0) + 1
    return {
        "method": f"gguf-{export.gguf_type}",
        "format": "gguf",
        "dst": str(export.path),
        "gguf_file": export.path.name,
        "quant_type": export.gguf_type.upper(),
        "device": "cpu",
        "storage": (
            f"GGUF {export.gguf_type.upper()} 2-D weights, F32 norms; transformers dequantizes "
            "it to float on load, llama.cpp computes on it directly"
        ),
        "include_embeddings": include_embeddings,
        "tensor_types": counts,
        "f16_fallback": export.f16_fallback,
        "calibrated_tensors": export.calibrated,
        "params": export.params,
        "float_weight_bytes": float_bytes,
        # The file's tensor data: what a runtime that keeps the format holds in memory.
        "weight_bytes": export.tensor_bytes,
        "weight_bytes_source": "tensor data stored in the GGUF file (header excluded)",
        "weight_bytes_ratio": export.tensor_bytes / float_bytes,
        "bits_per_weight": export.tensor_bytes * 8 / export.params,
        "disk_bytes": export.path.stat().st_size,
        "tied_embeddings": "output.weight absent (tied)"
        if "output.weight" not in export.tensor_types
        else False,
        "seconds": round(seconds, 2),
    }


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """``(B, T, V)`` fp32 logits on the CPU, one block at a time (bounded activations)."""
    device = next(model.parameters()).device
    with torch.inference_mode():
        rows = [
            model(input_ids=ids[i : i + 1].to(device), use_cache=False).logits.float().cpu()
            for i in range(ids.shape[0])
        ]
    return torch.cat(rows)


def calibration_groups(
    cfg: PipelineConfig, model: nn.Module, group_sizes: set[int], blocks: torch.Tensor
) -> dict[int, dict[str, Int4Groups]]:
    """GPTQ groups per group size for every Linear of ``model`` (not a tied LM head).

    Calibrated on the first ``quant.calibration_blocks`` of ``blocks`` (the run's *training*
    blocks, so the held-out blocks that score the variants never shape them).
    """
    from distill.quantize.gptq import calibrated_int4

    names = [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear)
        and m.weight is not model.get_input_embeddings().weight  # a tied head: 8-bit or 4-bit RTN
        and m.weight.shape[1] % max(group_sizes) == 0
    ]
    blocks = blocks[: cfg.quant.calibration_blocks]
    start = time.perf_counter()
    out = calibrated_int4(model, blocks, names, group_sizes)
    log.info(
        "GPTQ: %d linear layers, group sizes %s, on %d training blocks, %.1f s",
        len(names),
        sorted(group_sizes),
        blocks.shape[0],
        time.perf_counter() - start,
    )
    return out


def run(
    cfg: PipelineConfig,
    run_dir: Path,
    *,
    val_blocks: torch.Tensor | None = None,
    calib_blocks: torch.Tensor | None = None,
) -> list[dict]:
    """Write every variant of ``run_dir/final``, check each in a fresh process, summarise.

    Writes ``run_dir/quantized/<method>/`` per ``cfg.quant.methods`` entry,
    ``run_dir/quantized/gguf/student-<type>.gguf`` per ``cfg.quant.gguf`` entry,
    ``quantized/parity_blocks.safetensors`` (the held-out ids the parity check used) and
    ``quantized/quantize.json``: one record per artifact (:func:`quantize_folder`,
    :func:`gguf_record`), each with its ``parity`` figures (:mod:`distill.quantize.parity`).

    Args:
        val_blocks: held-out blocks ``(N, T)``; by default the run's validation split.
        calib_blocks: GPTQ calibration blocks; by default the run's training split.

    Raises:
        QuantizeError: ``run_dir/final`` does not exist, or a method fails as described in
            :func:`quantize_folder`.
        GGUFExportError: GGUF asked for a student llama.cpp cannot run as llama.
        ParityError: an artifact does not reproduce its model (quantize.json is written
            first, with the figures).
    """
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from distill.data import prepare_data
    from distill.quantize import parity
    from distill.quantize.gguf import check_exportable, export_gguf, reference_model

    run_dir = Path(run_dir)
    final = run_dir / "final"
    if not (final / "config.json").is_file():
        raise QuantizeError(
            f"{final} holds no trained model: run scripts/distill.py first, or set run_dir to a "
            "finished run"
        )
    if cfg.quant.gguf:
        check_exportable(AutoConfig.from_pretrained(final))  # before any work
    out = run_dir / "quantized"
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(final)
    int4_cpu = "int4_weight_only" in cfg.quant.methods and (
        default_device("int4_weight_only") == "cpu"
    )
    group_sizes = ({cfg.quant.group_size} if int4_cpu else set()) | (
        {32} if "q4_0" in cfg.quant.gguf else set()
    )
    needs_calibration = cfg.quant.calibration == "gptq" and bool(group_sizes)
    if val_blocks is None or (calib_blocks is None and needs_calibration):
        # One load of the run's data serves the parity check and the calibration.
        splits = prepare_data(cfg.data, tokenizer, cache_root(cfg))
        val_blocks = splits.val if val_blocks is None else val_blocks
        calib_blocks = splits.train if calib_blocks is None else calib_blocks
    ids = val_blocks[: parity.PARITY_BLOCKS]
    save_file({"ids": ids.contiguous()}, str(out / "parity_blocks.safetensors"))
    workdir = out / f".parity-{os.getpid()}"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir()

    float_model = AutoModelForCausalLM.from_pretrained(final, dtype="auto").eval()
    float_logits = _logits(float_model, ids)
    calibrated = (
        calibration_groups(cfg, float_model, group_sizes, calib_blocks) if needs_calibration else {}
    )
    float_bytes = weight_bytes(float_model)
    results: list[dict] = []
    artifacts: list[parity.Artifact] = []
    in_memory: dict[str, Path] = {}

    def keep_reference(name: str, model: nn.Module) -> None:
        in_memory[name] = workdir / f"{name}-in-memory.safetensors"
        save_file({"logits": _logits(model, ids).contiguous()}, str(in_memory[name]))

    steps = len(cfg.quant.methods) + len(cfg.quant.gguf)
    for i, method in enumerate(cfg.quant.methods, 1):
        log.info("quantize %d/%d: %s on %s", i, steps, method, final)
        result, qmodel = quantize_to_folder(
            final,
            out / method,
            method,
            include_embeddings=cfg.quant.include_embeddings,
            group_size=cfg.quant.group_size,
            calibrated=calibrated.get(cfg.quant.group_size),
            embedding_bits=cfg.quant.embedding_bits,
            compute_dtype=cfg.quant.compute_dtype,
        )
        keep_reference(method, qmodel)
        del qmodel
        artifacts.append(parity.Artifact(method, out / method, device=result["device"]))
        _log_result(result)
        results.append(result)
    for i, gguf_type in enumerate(cfg.quant.gguf, len(cfg.quant.methods) + 1):
        log.info("quantize %d/%d: GGUF %s of %s", i, steps, gguf_type, final)
        start = time.perf_counter()
        export = export_gguf(
            float_model,
            tokenizer,
            out / "gguf" / f"student-{gguf_type}.gguf",
            gguf_type,
            include_embeddings=cfg.quant.include_embeddings,
            name=f"{final.parent.name}-student-{gguf_type}",
            int4_groups=calibrated.get(32) if gguf_type == "q4_0" else None,
            embedding_bits=cfg.quant.embedding_bits,
        )
        result = gguf_record(
            export, float_bytes, cfg.quant.include_embeddings, time.perf_counter() - start
        )
        keep_reference(result["method"], reference_model(float_model, export))
        export.reference_state.clear()
        artifacts.append(parity.Artifact(result["method"], export.path.parent, export.path.name))
        _log_result(result)
        results.append(result)
    for gguf_type in set(GGUF_TYPES) - set(cfg.quant.gguf):  # files of an earlier run
        (out / "gguf" / f"student-{gguf_type}.gguf").unlink(missing_ok=True)
    del float_model

    # One held-out document's worth of text for the GGUF tokenizer check.
    text = tokenizer.decode(ids[0]) if cfg.quant.gguf else None
    source_ids = tokenizer(text)["input_ids"] if text is not None else None
    try:
        if not artifacts:  # nothing asked for: no child process to start
            shutil.rmtree(workdir, ignore_errors=True)
            return results
        parity.check_artifacts(
            results,
            artifacts,
            in_memory,
            float_logits,
            ids,
            workdir,
            text=text,
            source_token_ids=source_ids,
        )
    finally:
        # Written whole and renamed, so a crash never leaves a truncated summary; written
        # even when parity fails, so the figures of the failed artifact can be read.
        tmp = out / "quantize.json.tmp"
        tmp.write_text(json.dumps(results, indent=2) + "\n")
        os.replace(tmp, out / "quantize.json")
    return results


def _log_result(result: dict) -> None:
    log.info(
        "quantize %s: %.1f MB -> %.1f MB of weights (%.1f%%, %.2f bits/weight), %.1f s",
        result["method"],
        result["float_weight_bytes"] / 1e6,
        result["weight_bytes"] / 1e6,
        100 * result["weight_bytes_ratio"],
        result["bits_per_weight"],
        result["seconds"],
    )
    by_reason: dict[str, list[str]] = {}
    for skipped in result.get("skipped_modules") or []:
        by_reason.setdefault(skipped["reason"], []).append(skipped["name"])
    for reason, names in by_reason.items():
        log.info("  kept in float: %d module(s), e.g. %s: %s", len(names), names[0], reason)
    if result.get("f16_fallback"):
        log.info("  written F16 (rows not whole 32-value blocks): %s", result["f16_fallback"])
