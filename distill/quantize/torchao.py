"""torchao storage of the quantized student: configs, the int4/int8 tensors, casts.

What each ``quant.methods`` entry stores (torchao 0.18, bytes per weight of a 2-D weight):

* ``bf16`` / ``fp16``: every float tensor cast; 2 bytes per weight.
* ``int8_weight_only``: ``Int8Tensor``, int8 per output row with one fp32 scale per row;
  ~1 byte per weight on any device.
* ``int8_dynamic``: the same weights, plus per-token int8 activations at run time.
* ``int4_weight_only``: symmetric int4 groups of ``quant.group_size`` values (one fp16 scale
  per group, the Q4_0 grid), chosen by GPTQ on training blocks when
  ``quant.calibration=gptq`` (:mod:`distill.quantize.gptq`), else rounded to nearest. CPU:
  ``IntxUnpackedToInt8Tensor``, the int4 values stored *unpacked*, one per int8 byte (~1.06
  bytes per weight at group 32); the
  embedding and tied head at ``quant.embedding_bits`` (8: int8 per row). CUDA:
  ``Int4TilePackedTo4dTensor``, two values per byte in tinygemm's tile layout, bf16 scales and
  zeros, uncalibrated (that folder reloads on CUDA only); the embedding stays the unpacked
  tensor, which alone implements ``embedding``.

On CPU torchao 0.18 has no packed int4 tensor that transformers can reload
(``Int4WeightOnlyConfig`` needs CUDA or the ``mslk`` package; the CPU ``Int4OpaqueTensor`` is a
prototype outside torchao's safetensors allow-list), so a CPU ``int4_weight_only`` folder is
no smaller than int8. The truly 4-bit CPU artifact is the GGUF ``q4_0`` file (4.5 bits per
weight; :mod:`distill.quantize.gguf`), which llama.cpp runs directly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from distill.errors import DistillError
from distill.names import QUANT_METHODS
from distill.quantize.gptq import Int4Groups


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
    # built by int4_tensor from RTN or GPTQ groups (distill/quantize/gptq.py).
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


CAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
AO_CONFIGS: dict[str, Callable[[int, str], Any]] = {
    "int8_weight_only": _int8_weight_only,
    "int8_dynamic": _int8_dynamic,
    "int4_weight_only": _int4_weight_only,
}
assert set(AO_CONFIGS) | set(CAST) == set(QUANT_METHODS), "QUANT_METHODS and quantize disagree"


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


def storage_of(method: str, device: str) -> str:
    """What ``method`` stores on ``device`` (the CPU entry when the device has none)."""
    return STORAGE.get((method, device), STORAGE.get((method, "cpu"), ""))


def check_method(method: str) -> None:
    """Raises: QuantizeError: ``method`` is not one of ``distill.names.QUANT_METHODS``."""
    if method not in QUANT_METHODS:
        raise QuantizeError(
            f"unknown quant method {method!r}: choose from {', '.join(QUANT_METHODS)}"
        )


def default_device(method: str) -> str:
    """Where ``method`` is quantized by default: only int4 has a device-specific layout
    (packed for tinygemm on CUDA); everything else is quantized on the CPU."""
    return "cuda" if method == "int4_weight_only" and torch.cuda.is_available() else "cpu"


def cast_weights(model: nn.Module, dtype: torch.dtype) -> None:
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
