"""Write a llama-architecture student as one GGUF file for llama.cpp-family runtimes.

The file holds the weights in one of ``config.GGUF_TYPES`` (quantized in numpy by the ``gguf``
package) and the tokenizer, so ``llama-cli -m student-q4_0.gguf`` or
``AutoModelForCausalLM.from_pretrained(folder, gguf_file="student-q4_0.gguf")`` needs nothing
else. Conventions kept from llama.cpp's own converter (``convert_hf_to_gguf.py``):

* tensor names ``token_embd``, ``blk.N.attn_q`` ... ``output_norm``; a tied LM head is *not*
  written (``output.weight`` absent means tied, for llama.cpp and transformers alike);
* the rows of ``attn_q`` and ``attn_k`` are permuted per head from Hugging Face's rotate-half
  RoPE layout to GGML's interleaved-pair layout; transformers undoes it on load;
* 1-D tensors (RMSNorm weights) stay F32; a 2-D tensor whose rows are not a whole number of
  32-value blocks is written F16 and reported.

The quantized files (``q8_0``, ``q4_1``, ``q4_0``) quantize every 2-D weight, embedding
included, unless ``include_embeddings`` is false: the embedding (and so the tied head) is then
written F16. In the 4-bit files the embedding is ``q8_0`` unless ``embedding_bits=4``. ``q4_0``
weights can come from GPTQ (:mod:`distill.quantize.gptq`, packed here byte for byte as the gguf
package's own Q4_0 writer lays blocks out); ``q4_1`` always uses the gguf package's min/max
rounding, which on a student cut from our Q4_1 teacher snaps weights back onto the teacher's
grid (README, "Quantization").

Byte-level BPE tokenizers only (GPT-2 style, as SmolLM2, Llama 3, Qwen use): tokens in their
byte-alphabet spelling, merges, token types (control / user-defined added tokens), special
token ids, ``add_bos_token`` and the chat template.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from distill.config import GGUF_TYPES, DistillError
from distill.quantize.gptq import Int4Groups, pack_q4_0

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

BLOCK_VALUES = 32  # values per Q4_0 / Q4_1 / Q8_0 block


class GGUFExportError(DistillError):
    """The model or tokenizer cannot be written as GGUF."""


@dataclass
class GGUFExport:
    """What :func:`export_gguf` wrote.

    ``reference_state`` holds, under Hugging Face names, every weight exactly as a reader of
    the file gets it back (quantized then dequantized, in fp32): loading it into a copy of the
    float model gives the in-memory model the file must reproduce.
    """

    path: Path
    gguf_type: str
    tensor_types: dict[str, str]
    tensor_bytes: int
    params: int
    f16_fallback: list[str] = field(default_factory=list)
    # Tensors written from GPTQ groups rather than the gguf package's rounding.
    calibrated: int = 0
    reference_state: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)


_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_TOP_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def gguf_name(hf_name: str) -> str:
    """The llama.cpp tensor name of a ``LlamaForCausalLM`` state-dict key.

    Raises:
        GGUFExportError: a tensor llama.cpp's llama graph has no slot for (e.g. a bias).
    """
    if hf_name in _TOP_NAMES:
        return _TOP_NAMES[hf_name]
    m = _LAYER.match(hf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"blk.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    raise GGUFExportError(
        f"GGUF export: no llama.cpp tensor for {hf_name!r} (biases and extra modules are not "
        "supported); drop GGUF with quant.gguf=[]"
    )


def permute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Hugging Face q/k rows ``(n_heads * head_dim, in)`` -> GGML's interleaved RoPE order.

    Per head, HF keeps the two rotated halves apart ([x0..x31 | x32..x63]); GGML rotates
    adjacent pairs, so row ``i`` of the first half and row ``i`` of the second half become
    neighbours. :func:`unpermute_rope_rows` is the exact inverse.
    """
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, head_dim // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_theta(config: Any) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    return float(theta if theta is not None else getattr(config, "rope_theta", 10000.0))


def check_exportable(config: Any) -> None:
    """Fail before any work on a model llama.cpp's llama graph would compute differently.

    Raises:
        GGUFExportError: not ``model_type == "llama"``, attention/MLP biases, or RoPE scaling.
    """
    problems = []
    if getattr(config, "model_type", None) != "llama":
        problems.append(f"model_type is {getattr(config, 'model_type', None)!r}, not 'llama'")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        problems.append("attention_bias/mlp_bias are set")
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default") if isinstance(params, dict) else "default"
    if rope_type != "default":
        problems.append(f"RoPE scaling {rope_type!r} is not written")
    if problems:
        raise GGUFExportError(
            "GGUF export supports plain llama students only: "
            + "; ".join(problems)
            + " (set quant.gguf=[] to skip GGUF)"
        )


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


def _pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer (``tokenizer.ggml.pre``).

    llama.cpp picks its split regex by this name. Two shapes are recognised from
    ``tokenizer.json``: GPT-2's plain ``ByteLevel`` and SmolLM's ``Digits`` + ``ByteLevel``;
    anything else is written as ``default`` with a warning.
    """

    def byte_level(p: dict) -> bool:
        return p.get("type") == "ByteLevel" and p.get("use_regex", True)

    if pre and byte_level(pre):
        return "gpt-2"
    if pre and pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers") or []
        if (
            len(parts) == 2
            and parts[0].get("type") == "Digits"
            and parts[0].get("individual_digits")
            and byte_level(parts[1])
        ):
            return "smollm"
    log.warning("GGUF export: unrecognised pre-tokenizer %s, writing 'default'", pre)
    return "default"


def tokenizer_metadata(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> dict[str, Any]:
    """The ``tokenizer.*`` GGUF keys of a byte-level BPE tokenizer, padded to ``vocab_size``.

    Raises:
        GGUFExportError: not a fast byte-level BPE tokenizer, or more tokens than
            ``vocab_size`` rows in the embedding.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise GGUFExportError("GGUF export needs a fast (tokenizer.json) tokenizer")
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    decoder = spec.get("decoder") or {}
    if model.get("type") != "BPE" or decoder.get("type") != "ByteLevel":
        raise GGUFExportError(
            f"GGUF export writes byte-level BPE tokenizers only, this one is "
            f"{model.get('type')} with a {decoder.get('type')} decoder"
        )
    vocab: dict[str, int] = dict(model["vocab"])
    kinds = {}
    for added in spec.get("added_tokens") or []:
        vocab[added["content"]] = added["id"]
        kinds[added["id"]] = 3 if added.get("special") else 4  # CONTROL / USER_DEFINED
    n = max(vocab.values()) + 1
    if n > vocab_size:
        raise GGUFExportError(f"tokenizer has {n} tokens but the embedding only {vocab_size} rows")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [5] * vocab_size  # UNUSED, for rows no token maps to
    for token, i in vocab.items():
        tokens[i] = token
        types[i] = kinds.get(i, 1)  # NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]

    def token_id(name: str) -> int | None:
        value = getattr(tokenizer, f"{name}_token_id", None)
        return int(value) if value is not None else None

    meta: dict[str, Any] = {
        "model": "gpt2",
        "pre": _pre_tokenizer_name(spec.get("pre_tokenizer")),
        "tokens": tokens,
        "token_types": types,
        "merges": merges,
        "bos": token_id("bos"),
        "eos": token_id("eos"),
        "unk": token_id("unk"),
        "pad": token_id("pad"),
        # Whether encoding prepends BOS, as the runtime should when it tokenizes a prompt.
        "add_bos": bool(
            token_id("bos") is not None
            and tokenizer("a")["input_ids"][:1] == [token_id("bos")]
            and tokenizer("a", add_special_tokens=False)["input_ids"][:1] != [token_id("bos")]
        ),
        "chat_template": tokenizer.chat_template
        if isinstance(tokenizer.chat_template, str)
        else None,
    }
    return meta


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


def _qtype(name: str) -> Any:
    from gguf import GGMLQuantizationType

    return {
        "f32": GGMLQuantizationType.F32,
        "f16": GGMLQuantizationType.F16,
        "q8_0": GGMLQuantizationType.Q8_0,
        "q4_1": GGMLQuantizationType.Q4_1,
        "q4_0": GGMLQuantizationType.Q4_0,
    }[name]


def _file_type(gguf_type: str) -> int:
    from gguf import LlamaFileType

    return {
        "f16": LlamaFileType.MOSTLY_F16,
        "q8_0": LlamaFileType.MOSTLY_Q8_0,
        "q4_1": LlamaFileType.MOSTLY_Q4_1,
        "q4_0": LlamaFileType.MOSTLY_Q4_0,
    }[gguf_type]


def _tensor_type(
    name: str, w: np.ndarray, gguf_type: str, include_embeddings: bool, embedding_bits: int
) -> str:
    if w.ndim == 1:
        return "f32"
    if name == "token_embd.weight" and not include_embeddings:
        return "f16"
    if gguf_type != "f16" and w.shape[-1] % BLOCK_VALUES:
        return "f16"
    if name == "token_embd.weight" and gguf_type in ("q4_0", "q4_1") and embedding_bits == 8:
        return "q8_0"  # the tied output: llama.cpp's own Q4 mixes keep it above 4 bits too
    return gguf_type


def export_gguf(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    path: Path,
    gguf_type: str,
    *,
    include_embeddings: bool = True,
    name: str | None = None,
    int4_groups: dict[str, Int4Groups] | None = None,
    embedding_bits: int = 8,
) -> GGUFExport:
    """Write ``model`` (``LlamaForCausalLM``, any layer count) and its tokenizer to ``path``.

    The file is written next to ``path`` under a temporary name and renamed into place.

    Args:
        gguf_type: one of ``config.GGUF_TYPES`` for the 2-D weights.
        include_embeddings: quantize the embedding (and tied head); false keeps it F16.
        name: ``general.name`` (defaults to the file's stem).
        int4_groups: ``q4_0`` only: GPTQ groups (group size 32) per module name, written as
            they are instead of the gguf package's rounding (:mod:`distill.quantize.gptq`).
        embedding_bits: 8 writes the embedding of a ``q4_0``/``q4_1`` file as ``q8_0``.

    Raises:
        GGUFExportError: see :func:`check_exportable` and :func:`tokenizer_metadata`.
    """
    import gguf

    if gguf_type not in GGUF_TYPES:
        raise GGUFExportError(f"unknown GGUF type {gguf_type!r}: choose from {GGUF_TYPES}")
    check_exportable(model.config)
    tok = tokenizer_metadata(tokenizer, int(model.config.vocab_size))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    writer.add_name(name or path.stem)
    _add_model_metadata(writer, model.config, gguf_type)
    _add_tokenizer_metadata(writer, tok)
    result = GGUFExport(path=path, gguf_type=gguf_type, tensor_types={}, tensor_bytes=0, params=0)
    _add_tensors(writer, model, result, include_embeddings, int4_groups or {}, embedding_bits)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return result


def _heads(config: Any) -> tuple[int, int, int]:
    """Attention heads, key/value heads and the head dimension of a llama config."""
    n_heads = int(config.num_attention_heads)
    n_kv = int(config.num_key_value_heads or n_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // n_heads)
    return n_heads, n_kv, head_dim


def _add_model_metadata(writer: Any, config: Any, gguf_type: str) -> None:
    """The ``llama.*`` hyper-parameters and the file type."""
    import gguf

    n_heads, n_kv, head_dim = _heads(config)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // n_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))
    writer.add_file_type(_file_type(gguf_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_tokenizer_metadata(writer: Any, tok: dict[str, Any]) -> None:
    """The ``tokenizer.ggml.*`` keys and the chat template (:func:`tokenizer_metadata`)."""
    writer.add_tokenizer_model(tok["model"])
    writer.add_tokenizer_pre(tok["pre"])
    writer.add_token_list(tok["tokens"])
    writer.add_token_types(tok["token_types"])
    if tok["merges"]:
        writer.add_token_merges(tok["merges"])
    else:
        # A vocabulary of single symbols has no merges; readers then rebuild merges from
        # scores, and with the id order as score they find none, as it should be.
        writer.add_token_scores([-float(i) for i in range(len(tok["tokens"]))])
    for key, add in (
        ("bos", writer.add_bos_token_id),
        ("eos", writer.add_eos_token_id),
        ("unk", writer.add_unk_token_id),
        ("pad", writer.add_pad_token_id),
    ):
        if tok[key] is not None:
            add(tok[key])
    writer.add_add_bos_token(tok["add_bos"])
    if tok["chat_template"]:
        writer.add_chat_template(tok["chat_template"])


def _encode(
    hf_name: str, w: np.ndarray, kind: str, groups: Int4Groups | None, rope_heads: int | None
) -> tuple[np.ndarray, np.ndarray, Any]:
    """``w`` as stored in the file: (data, the values a reader gets back, GGML raw dtype or
    None for plain f32/f16). ``w`` and ``groups`` rows are still in Hugging Face order."""
    import gguf

    if kind == "f32":
        return w, w, None
    if kind == "f16":
        data = w.astype(np.float16)
        return data, data.astype(np.float32), None
    if kind == "q4_0" and groups is not None:
        if groups.group_size != BLOCK_VALUES:
            raise GGUFExportError(
                f"{hf_name}: Q4_0 needs groups of {BLOCK_VALUES}, got {groups.group_size}"
            )
        levels, scales = groups.levels.numpy(), groups.scales.numpy()
        if rope_heads:  # rows move together with their groups
            levels = permute_rope_rows(levels, rope_heads)
            scales = permute_rope_rows(scales, rope_heads)
        data = pack_q4_0(Int4Groups(torch.from_numpy(levels), torch.from_numpy(scales)))
    else:
        data = gguf.quants.quantize(w, _qtype(kind))
    return data, gguf.quants.dequantize(data, _qtype(kind)), _qtype(kind)


def _add_tensors(
    writer: Any,
    model: PreTrainedModel,
    result: GGUFExport,
    include_embeddings: bool,
    int4_groups: dict[str, Int4Groups],
    embedding_bits: int,
) -> None:
    """Every weight of ``model`` into ``writer``; ``result`` records types, bytes and the
    dequantized reference weights (under Hugging Face names, rows in Hugging Face order)."""
    n_heads, n_kv, _ = _heads(model.config)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    state = model.state_dict()
    for hf_name, tensor in state.items():
        if hf_name == "lm_head.weight" and tied:
            continue  # absent output.weight = tied, for llama.cpp and transformers alike
        out_name = gguf_name(hf_name)
        w = tensor.detach().to(torch.float32).cpu().numpy()
        # q and k rows are reordered for GGML's RoPE (per head); None: stored as they are.
        rope_heads = (
            n_heads
            if hf_name.endswith("q_proj.weight")
            else n_kv
            if hf_name.endswith("k_proj.weight")
            else None
        )
        if rope_heads:
            w = permute_rope_rows(w, rope_heads)
        kind = _tensor_type(out_name, w, result.gguf_type, include_embeddings, embedding_bits)
        groups = int4_groups.get(hf_name.removesuffix(".weight"))
        if kind == "f16" and result.gguf_type != "f16" and w.ndim == 2:
            result.f16_fallback.append(out_name)
        data, back, raw_dtype = _encode(hf_name, w, kind, groups, rope_heads)
        if raw_dtype is None:
            writer.add_tensor(out_name, data)
        else:
            writer.add_tensor(out_name, data, raw_dtype=raw_dtype)
        if kind == "q4_0" and groups is not None:
            result.calibrated += 1
        if rope_heads:
            back = unpermute_rope_rows(back, rope_heads)
        result.reference_state[hf_name] = torch.from_numpy(np.ascontiguousarray(back))
        result.tensor_types[out_name] = kind
        result.tensor_bytes += int(data.nbytes)
        result.params += int(w.size)
    if tied and "lm_head.weight" in state:
        result.reference_state["lm_head.weight"] = result.reference_state[
            "model.embed_tokens.weight"
        ]


def gguf_tensor_bytes(path: Path) -> int:
    """Bytes of the tensor data stored in a GGUF file (its header and metadata excluded)."""
    from gguf import GGUFReader

    return int(sum(int(t.n_bytes) for t in GGUFReader(str(path)).tensors))


def reference_model(model: PreTrainedModel, export: GGUFExport) -> PreTrainedModel:
    """A float copy of ``model`` holding the weights exactly as the GGUF file stores them."""
    import copy

    ref = copy.deepcopy(model).to(torch.float32)
    missing, unexpected = ref.load_state_dict(export.reference_state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise GGUFExportError(f"GGUF reference: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if getattr(ref.config, "tie_word_embeddings", False):
        ref.tie_weights()
    return ref.eval()
