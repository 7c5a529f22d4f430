"""Per-architecture GGUF layouts: what llama.cpp loads for llama, qwen2, qwen3, gemma2, gemma3,
gpt2.

Each layout was written from llama.cpp's own converter (``convert_hf_to_gguf.py``, its
``conversion/{llama,qwen,gpt2}.py`` classes) and loaders (``src/models/<arch>.cpp``), read at
the version llama-cpp-python 0.3.36 vendors:

* **llama** (also Llama 3.x with ``rope_type: llama3``): GGML's RoPE rotates adjacent pairs,
  so the rows of ``attn_q``/``attn_k`` (and their biases) are permuted per head from Hugging
  Face's rotate-half order. Llama 3's frequency scaling is no metadata key: it is the F32
  tensor ``rope_freqs.weight`` ``(head_dim // 2,)``, by which GGML divides each frequency.
* **qwen2** (q/k/v biases) and **qwen3** (RMSNorm ``attn_q_norm``/``attn_k_norm`` over each
  head, ``key_length`` written as ``head_dim`` may differ from ``hidden / heads``): NEOX RoPE,
  which *is* rotate-half, so the rows are written as they are.
* **gemma3** (transformers' ``gemma3_text``): four RMSNorms a block (before and after
  attention and MLP) plus per-head ``attn_q_norm``/``attn_k_norm``, a tanh-GELU gated MLP,
  NEOX RoPE. Gemma's RMSNorm multiplies by ``1 + weight`` and llama.cpp's by ``weight``, so
  every norm is written shifted by one (as the converter's ``norm_shift``). The embedding's
  ``sqrt(hidden)`` scale is llama.cpp's own, no tensor. Which layers slide is written per
  layer (``attention.sliding_window_pattern`` as a bool array, read by llama.cpp's
  ``load_swa_pattern``), so a student whose cut broke Gemma's every-sixth-layer rhythm
  still runs its own pattern; the sliding layers' RoPE base is ``rope.freq_base_swa``.
* **gemma2**: Gemma 3's block without the per-head q/k norms, one RoPE base for every layer,
  and soft-capping: llama.cpp's graph always caps the attention scores and the final logits
  (``attn_logit_softcapping``, ``final_logit_softcapping``; its defaults 50 and 30 when the
  keys are absent), so a model without both is refused. The sliding layers are written as
  Gemma 3's are (a bool array), which llama.cpp's gemma2 loader reads (without it, every
  other layer from the first slides), so any cut's pattern runs as it is. For both Gemmas a
  model with no sliding layer is refused: llama.cpp aborts the process loading one.
* **gpt2**: fused ``attn_qkv``, LayerNorm with biases, an F32 ``position_embd`` of exactly
  ``n_positions`` rows, no RoPE; Conv1D weights are stored ``(in, out)`` and are transposed
  by the writer (:mod:`distill.quantize.gguf`).

llama.cpp refuses a file holding a tensor its loader never asks for ("wrong number of
tensors"), so a layout lists exactly the tensors the arch loads: a state-dict key outside it
is refused, never written.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from distill.errors import DistillError

SKIP_FIX = "set quant.gguf=[] to skip GGUF"


class GGUFExportError(DistillError):
    """The model or tokenizer cannot be written as GGUF."""


@dataclass(frozen=True)
class ArchLayout:
    """How one Hugging Face architecture maps onto a llama.cpp arch."""

    arch: str  # general.architecture, the llama.cpp graph that runs the file
    top: Mapping[str, str]  # HF key -> GGUF name, outside the blocks
    block: re.Pattern[str]  # HF key of a block tensor: (index, suffix)
    layer: Mapping[str, str]  # HF suffix -> GGUF suffix inside ``blk.N.``
    permute_qk: bool  # GGML pair-wise RoPE (LLAMA_ROPE_TYPE_NORM): permute q/k rows
    norm_shift: float = 0.0  # added to every ``*norm.weight`` on the way into the file


def _linear(hf: str, gg: str, bias: bool) -> dict[str, str]:
    out = {f"{hf}.weight": f"{gg}.weight"}
    return out | {f"{hf}.bias": f"{gg}.bias"} if bias else out


_RMS_NORMS = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}


def _decoder_layer(qkv_bias: bool, o_bias: bool, mlp_bias: bool, qk_norm: bool) -> dict:
    names = dict(_RMS_NORMS)
    for hf, gg in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v")):
        names |= _linear(f"self_attn.{hf}", gg, qkv_bias)
    names |= _linear("self_attn.o_proj", "attn_output", o_bias)
    for hf, gg in (("gate_proj", "ffn_gate"), ("up_proj", "ffn_up"), ("down_proj", "ffn_down")):
        names |= _linear(f"mlp.{hf}", gg, mlp_bias)
    if qk_norm:
        names |= {"self_attn.q_norm.weight": "attn_q_norm.weight"}
        names |= {"self_attn.k_norm.weight": "attn_k_norm.weight"}
    return names


def _gemma_layer(qk_norm: bool) -> dict[str, str]:
    """Gemma 2's and 3's block: four RMSNorms (before and after attention and MLP)."""
    names = {
        "input_layernorm.weight": "attn_norm.weight",
        "post_attention_layernorm.weight": "post_attention_norm.weight",
        "pre_feedforward_layernorm.weight": "ffn_norm.weight",
        "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
    }
    plain = _decoder_layer(False, False, False, qk_norm)
    return names | {k: v for k, v in plain.items() if k not in _RMS_NORMS}


_DECODER_TOP = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_DECODER_BLOCK = re.compile(r"^model\.layers\.(\d+)\.(.+)$")

_GPT2_LAYER = {
    f"{hf}.{part}": f"{gg}.{part}"
    for hf, gg in (
        ("ln_1", "attn_norm"),
        ("attn.c_attn", "attn_qkv"),
        ("attn.c_proj", "attn_output"),
        ("ln_2", "ffn_norm"),
        ("mlp.c_fc", "ffn_up"),
        ("mlp.c_proj", "ffn_down"),
    )
    for part in ("weight", "bias")
}

# Keyed by transformers' model_type. The llama loader takes every bias as optional (the
# converter permutes q/k biases like their rows); qwen2's has q/k/v biases only, and qwen3's
# no o_proj bias, so ``attention_bias`` is refused there (check_exportable).
LAYOUTS: dict[str, ArchLayout] = {
    "llama": ArchLayout(
        "llama", _DECODER_TOP, _DECODER_BLOCK, _decoder_layer(True, True, True, False), True
    ),
    "qwen2": ArchLayout(
        "qwen2", _DECODER_TOP, _DECODER_BLOCK, _decoder_layer(True, False, False, False), False
    ),
    "qwen3": ArchLayout(
        "qwen3", _DECODER_TOP, _DECODER_BLOCK, _decoder_layer(False, False, False, True), False
    ),
    "gemma2": ArchLayout(
        "gemma2", _DECODER_TOP, _DECODER_BLOCK, _gemma_layer(False), False, norm_shift=1.0
    ),
    "gemma3_text": ArchLayout(
        "gemma3", _DECODER_TOP, _DECODER_BLOCK, _gemma_layer(True), False, norm_shift=1.0
    ),
    "gpt2": ArchLayout(
        "gpt2",
        {
            "transformer.wte.weight": "token_embd.weight",
            "transformer.wpe.weight": "position_embd.weight",
            "transformer.ln_f.weight": "output_norm.weight",
            "transformer.ln_f.bias": "output_norm.bias",
            "lm_head.weight": "output.weight",
        },
        re.compile(r"^transformer\.h\.(\d+)\.(.+)$"),
        _GPT2_LAYER,
        False,
    ),
}


def layout(config: Any) -> ArchLayout:
    """The layout of ``config.model_type`` (call :func:`check_exportable` first).

    Raises:
        GGUFExportError: an architecture with no layout here.
    """
    model_type = getattr(config, "model_type", None)
    if model_type not in LAYOUTS:
        raise GGUFExportError(
            f"GGUF export: model_type {model_type!r} has no llama.cpp layout here (supported: "
            f"{sorted(LAYOUTS)}); {SKIP_FIX}"
        )
    return LAYOUTS[model_type]


def gguf_name(arch: ArchLayout, hf_name: str) -> str:
    """The llama.cpp tensor name of the state-dict key ``hf_name`` under ``arch``.

    Raises:
        GGUFExportError: a tensor the arch's llama.cpp loader has no slot for; writing it
            would make llama.cpp refuse the file.
    """
    if hf_name in arch.top:
        return arch.top[hf_name]
    m = arch.block.match(hf_name)
    if m and m.group(2) in arch.layer:
        return f"blk.{m.group(1)}.{arch.layer[m.group(2)]}"
    raise GGUFExportError(
        f"GGUF export: llama.cpp's {arch.arch} graph has no tensor for {hf_name!r}; {SKIP_FIX}"
    )


def norm_shift(arch: ArchLayout, gguf_tensor: str) -> float:
    """What is added to the tensor ``gguf_tensor`` on its way into the file (Gemma's norms)."""
    return arch.norm_shift if gguf_tensor.endswith("norm.weight") else 0.0


def permute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Hugging Face q/k rows ``(n_heads * head_dim, ...)`` -> GGML's pair-wise RoPE order.

    Per head, HF keeps the two rotated halves apart ([x0..x31 | x32..x63]); GGML's llama graph
    rotates adjacent pairs, so row ``i`` of the first half and row ``i`` of the second half
    become neighbours. Works on weights ``(rows, in)`` and biases ``(rows,)`` alike;
    :func:`unpermute_rope_rows` is the exact inverse.
    """
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, head_dim // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def heads(config: Any) -> tuple[int, int, int]:
    """Attention heads, key/value heads and the head dimension of a config."""
    n_heads = int(getattr(config, "num_attention_heads", None) or config.n_head)
    n_kv = int(getattr(config, "num_key_value_heads", None) or n_heads)
    hidden = int(getattr(config, "hidden_size", None) or config.n_embd)
    head_dim = int(getattr(config, "head_dim", None) or hidden // n_heads)
    return n_heads, n_kv, head_dim


def rope_parameters(config: Any, layer_type: str = "full_attention") -> dict[str, Any]:
    """The RoPE parameters of ``layer_type``'s layers (a per-layer-type dict unwrapped)."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    params = dict(params) if isinstance(params, Mapping) else {}
    if isinstance(params.get(layer_type), Mapping):
        params = dict(params[layer_type])
    if "rope_theta" not in params:
        params["rope_theta"] = getattr(config, "rope_theta", None) or 10000.0
    params.setdefault("rope_type", "default")
    return params


def llama3_rope_factors(params: Mapping[str, Any], head_dim: int) -> np.ndarray:
    """Llama 3's per-frequency divisors ``(head_dim // 2,)`` F32, for ``rope_freqs.weight``.

    GGML computes ``theta / factor``; transformers scales ``inv_freq`` in three bands (low
    frequencies by ``1/factor``, high ones unchanged, a smooth blend between), so the factor
    is the inverse of that scale: ``factor``, 1, or ``1 / ((1 - s) / factor + s)``.
    """
    base = float(params["rope_theta"])
    factor = float(params.get("factor", 8.0))
    low = float(params.get("low_freq_factor", 1.0))
    high = float(params.get("high_freq_factor", 4.0))
    old_ctx = float(params.get("original_max_position_embeddings", 8192))
    inv_freq = base ** -(np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_ctx / wavelen - low) / (high - low)
    out = np.where(
        wavelen < old_ctx / high,
        1.0,
        np.where(wavelen > old_ctx / low, factor, 1.0 / ((1 - smooth) / factor + smooth)),
    )
    return out.astype(np.float32)


def extra_tensors(config: Any) -> dict[str, np.ndarray]:
    """Tensors the file needs that the state dict lacks: ``rope_freqs.weight`` for llama3."""
    params = rope_parameters(config)
    if layout(config).arch == "llama" and params["rope_type"] == "llama3":
        return {"rope_freqs.weight": llama3_rope_factors(params, heads(config)[2])}
    return {}


_ROPE_TYPES = {"llama": ("default", "llama3"), "qwen2": ("default",), "qwen3": ("default",)}
_GPT2_GELUS = ("gelu_new", "gelu_pytorch_tanh")  # tanh GELU, what ggml_gelu computes


def _decoder_problems(config: Any, arch: str) -> list[str]:
    problems = []
    if getattr(config, "hidden_act", "silu") != "silu":
        problems.append(f"hidden_act is {config.hidden_act!r}, llama.cpp's {arch} MLP is SiLU")
    params = rope_parameters(config)
    if params["rope_type"] not in _ROPE_TYPES[arch]:
        problems.append(
            f"rope_parameters.rope_type is {params['rope_type']!r} (written for {arch}: "
            f"{', '.join(_ROPE_TYPES[arch])})"
        )
    rotary = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    if rotary not in (None, 1, 1.0):
        problems.append(f"partial_rotary_factor is {rotary} (llama.cpp rotates whole heads)")
    n_heads, _, head_dim = heads(config)
    if arch == "qwen2" and n_heads * head_dim != config.hidden_size:
        problems.append("head_dim * num_attention_heads != hidden_size (qwen2's loader assumes it)")
    if arch in ("qwen2", "qwen3") and (
        getattr(config, "use_sliding_window", False)
        or "sliding_attention" in (getattr(config, "layer_types", None) or [])
    ):
        problems.append(f"use_sliding_window is set (llama.cpp's {arch} graph has no window)")
    if arch == "qwen3" and getattr(config, "attention_bias", False):
        problems.append("attention_bias is set (llama.cpp's qwen3 loader has no o_proj bias)")
    return problems


# The depth at which llama.cpp takes a model for its 27B (Gemma 2: 46, Gemma 3: 62), whose
# queries it scales by hidden / heads instead of the head size.
_GEMMA_27B_DEPTH = {"gemma2": 46, "gemma3": 62}


def gemma_attention_scale_dim(config: Any, arch: str) -> int:
    """The size whose inverse square root llama.cpp's gemma2/gemma3 graph scales queries by:
    the head size, but ``hidden / heads`` at the 27B's depth (whose
    ``query_pre_attn_scalar`` is so)."""
    n_heads, _, head_dim = heads(config)
    if config.num_hidden_layers == _GEMMA_27B_DEPTH[arch]:
        return config.hidden_size // n_heads
    return head_dim


def sliding_pattern(config: Any) -> list[bool]:
    """Per layer, whether it attends through the sliding window (Gemma 3's ``layer_types``)."""
    types = getattr(config, "layer_types", None) or []
    return [t == "sliding_attention" for t in types][: config.num_hidden_layers]


def _gemma_problems(config: Any, arch: str) -> list[str]:
    """What Gemma 2 and 3 share: the MLP, no biases, causal, the query scale, layer types."""
    problems = []
    if getattr(config, "hidden_activation", None) != "gelu_pytorch_tanh":
        problems.append(
            f"hidden_activation is {getattr(config, 'hidden_activation', None)!r} (llama.cpp's "
            f"{arch} MLP is the tanh GELU, gelu_pytorch_tanh)"
        )
    if getattr(config, "attention_bias", False):
        problems.append(f"attention_bias is set (llama.cpp's {arch} loader has no biases)")
    if getattr(config, "use_bidirectional_attention", False):
        problems.append("use_bidirectional_attention is set (a causal graph)")
    scale_dim = gemma_attention_scale_dim(config, arch)
    if getattr(config, "query_pre_attn_scalar", scale_dim) != scale_dim:
        problems.append(
            f"query_pre_attn_scalar is {config.query_pre_attn_scalar} (llama.cpp scales "
            f"queries by 1/sqrt({scale_dim}) at this shape)"
        )
    pattern = sliding_pattern(config)
    if len(pattern) != config.num_hidden_layers:
        problems.append("layer_types does not name every layer's attention")
    elif not any(pattern):
        # llama.cpp aborts the whole process on such a file (GGML_ASSERT is_swa_any).
        problems.append(
            f"layer_types has no sliding_attention layer (llama.cpp's {arch} loader needs one; "
            "keep a sliding teacher layer in pair.student.layers)"
        )
    return problems


def _gemma2_problems(config: Any) -> list[str]:
    problems = _gemma_problems(config, "gemma2")
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if not getattr(config, key, None):
            problems.append(
                f"{key} is not set (llama.cpp's gemma2 graph always caps, at 50 and 30 "
                "without the keys)"
            )
    rope_type = rope_parameters(config)["rope_type"]
    if rope_type != "default":
        problems.append(f"rope_parameters.rope_type is {rope_type!r} (written: default)")
    return problems


def _gemma3_problems(config: Any) -> list[str]:
    problems = _gemma_problems(config, "gemma3")
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if getattr(config, key, None):
            problems.append(f"{key} is set (llama.cpp's gemma3 graph does not cap)")
    for layer_type, allowed in (
        ("full_attention", ("default", "linear")),
        ("sliding_attention", ("default",)),
    ):
        rope_type = rope_parameters(config, layer_type)["rope_type"]
        if rope_type not in allowed:
            problems.append(
                f"rope_parameters.{layer_type}.rope_type is {rope_type!r} (written: "
                f"{', '.join(allowed)})"
            )
    return problems


def _gpt2_problems(config: Any) -> list[str]:
    problems = []
    if config.activation_function not in _GPT2_GELUS:
        problems.append(
            f"activation_function is {config.activation_function!r} (llama.cpp's gpt2 graph "
            "uses the tanh GELU, gelu_new)"
        )
    if not getattr(config, "scale_attn_weights", True):
        problems.append("scale_attn_weights is false (llama.cpp scales by 1/sqrt(head_dim))")
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        problems.append("scale_attn_by_inverse_layer_idx is set (not in llama.cpp's gpt2 graph)")
    if getattr(config, "add_cross_attention", False):
        problems.append("add_cross_attention is set (a decoder-only graph)")
    return problems


def check_exportable(config: Any) -> None:
    """Fail before any work on a model llama.cpp would compute differently from transformers.

    Supported: ``model_type`` llama (RoPE ``default`` or ``llama3``, biases allowed), qwen2
    (no sliding window), qwen3 (no sliding window, no attention bias), gemma3_text (tanh
    GELU, no soft-capping, queries scaled as llama.cpp does, linear or no RoPE scaling),
    gemma2 (the same, but soft-capped both ways, sliding every other layer, no RoPE scaling) and
    gpt2 (tanh GELU, attention scaled by ``1/sqrt(head_dim)``). Reading
    ``reorder_and_upcast_attn`` is not needed: it changes the fp16 rounding of GPT-2's
    attention, not its maths.

    Raises:
        GGUFExportError: every problem found, each naming its config key, and the fix
            ``quant.gguf=[]``.
    """
    model_type = getattr(config, "model_type", None)
    if model_type not in LAYOUTS:
        problems = [f"model_type is {model_type!r} (supported: {', '.join(sorted(LAYOUTS))})"]
    elif model_type == "gpt2":
        problems = _gpt2_problems(config)
    elif model_type == "gemma3_text":
        problems = _gemma3_problems(config)
    elif model_type == "gemma2":
        problems = _gemma2_problems(config)
    else:
        problems = _decoder_problems(config, model_type)
    if problems:
        raise GGUFExportError(
            "GGUF export: llama.cpp would not compute this student as transformers does: "
            + "; ".join(problems)
            + f" ({SKIP_FIX})"
        )


def add_model_metadata(writer: Any, config: Any) -> None:
    """The ``{arch}.*`` hyper-parameters llama.cpp's loader reads for ``config``'s arch.

    Keys it would default rightly are written anyway when cheap (``rope.dimension_count``,
    ``vocab_size``), so the file says what it holds.
    """
    arch = layout(config).arch
    if arch == "gpt2":
        writer.add_context_length(int(config.n_positions))  # the loader sizes position_embd by it
        writer.add_embedding_length(int(config.n_embd))
        writer.add_block_count(int(config.n_layer))
        writer.add_feed_forward_length(int(config.n_inner or 4 * config.n_embd))
        writer.add_head_count(int(config.n_head))
        writer.add_layer_norm_eps(float(config.layer_norm_epsilon))
        return
    n_heads, n_kv, head_dim = heads(config)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(head_dim)
    # The loader defaults the head size to hidden / heads; qwen3's and gemma3's often differ.
    if arch in ("qwen3", "gemma2", "gemma3") or head_dim != config.hidden_size // n_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    # llama3 scaling is rope_freqs.weight (extra_tensors), no key: as llama.cpp's converter.
    writer.add_rope_freq_base(float(rope_parameters(config)["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))
    if arch == "gemma3":
        _add_gemma3_metadata(writer, config)
    if arch == "gemma2":
        writer.add_sliding_window(int(config.sliding_window))
        writer.add_sliding_window_pattern(sliding_pattern(config))
        writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping))
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping))


def _add_gemma3_metadata(writer: Any, config: Any) -> None:
    """Gemma 3's window, which layers use it, their RoPE base, and the full layers' scaling."""
    import gguf

    writer.add_sliding_window(int(config.sliding_window))
    writer.add_sliding_window_pattern(sliding_pattern(config))
    sliding = rope_parameters(config, "sliding_attention")
    writer.add_rope_freq_base_swa(float(sliding["rope_theta"]))
    full = rope_parameters(config)
    if full["rope_type"] == "linear":  # only the full layers scale (llama.cpp: freq_scale)
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(full["factor"]))
