"""Write a student as one GGUF file for llama.cpp-family runtimes.

The file holds the weights in one of ``distill.names.GGUF_TYPES`` (quantized in numpy by the
``gguf`` package) and the tokenizer (:mod:`distill.quantize.gguf_tokenizer`), so ``llama-cli -m
student-q4_0.gguf`` needs nothing else. Architectures: llama (RoPE ``default`` or Llama 3's
``llama3``), qwen2, qwen3, gemma2, gemma3 and gpt2, each laid out as llama.cpp's own converter
writes it (:mod:`distill.quantize.gguf_arch`):

* tensor names ``token_embd``, ``blk.N.attn_q`` ... ``output_norm``; a tied LM head is *not*
  written (``output.weight`` absent means tied, for llama.cpp and transformers alike);
* for llama only, the rows of ``attn_q`` and ``attn_k`` are permuted per head from Hugging
  Face's rotate-half RoPE layout to GGML's pair-wise one; GPT-2's Conv1D weights are
  transposed to ``(out, in)``; Gemma's norms are written as ``1 + weight``;
* 1-D tensors (norms, biases, ``rope_freqs``) and GPT-2's ``position_embd`` stay F32; a 2-D
  tensor whose rows are not a whole number of 32-value blocks is written F16 and reported.

transformers reads these files back (``from_pretrained(folder, gguf_file=...)``, dequantized)
except for one thing: its loader drops ``rope_freqs.weight``, so a llama3 file reloads with
plain RoPE there. llama.cpp is the reference for those; :func:`reference_model` is the
in-memory model every file must reproduce.

The quantized files (``q8_0``, ``q4_1``, ``q4_0``) quantize every 2-D weight, embedding
included, unless ``include_embeddings`` is false: the embedding (and so the tied head) is then
written F16. In the 4-bit files the embedding is ``q8_0`` unless ``embedding_bits=4``. ``q4_0``
weights can come from GPTQ (:mod:`distill.quantize.gptq`, packed here byte for byte as the gguf
package's own Q4_0 writer lays blocks out); ``q4_1`` always uses the gguf package's min/max
rounding, which on a student cut from our Q4_1 teacher snaps weights back onto the teacher's
grid (README, "Quantization").
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from distill.names import GGUF_TYPES
from distill.quantize.gguf_arch import (
    ArchLayout,
    GGUFExportError,
    add_model_metadata,
    check_exportable,
    extra_tensors,
    gguf_name,
    heads,
    layout,
    norm_shift,
    permute_rope_rows,
    unpermute_rope_rows,
)
from distill.quantize.gguf_tokenizer import add_tokenizer_metadata, tokenizer_metadata
from distill.quantize.gptq import Int4Groups, pack_q4_0
from distill.run_dir import process_tag

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "GGUFExport",
    "GGUFExportError",
    "check_exportable",
    "export_gguf",
    "gguf_name",
    "gguf_tensor_bytes",
    "permute_rope_rows",
    "read_export",
    "reference_model",
    "tokenizer_metadata",
    "unpermute_rope_rows",
]


# The gguf package logs each file's tensor count and temp path at INFO; the quantize record
# already says what was written.
logging.getLogger("gguf.gguf_writer").setLevel(logging.WARNING)

# Bump when the bytes export_gguf writes change: caches of exported files (the evaluate
# stage's teacher F16) are keyed by it, so an old export is not reused after an upgrade.
WRITER_VERSION = 2
BLOCK_VALUES = 32  # values per Q4_0 / Q4_1 / Q8_0 block


@dataclass
class GGUFExport:
    """What :func:`export_gguf` wrote.

    ``reference_state`` holds, under Hugging Face names and in Hugging Face layout, every
    weight exactly as a reader of the file gets it back (quantized then dequantized, in
    fp32): loading it into a copy of the float model gives the in-memory model the file must
    reproduce. ``params`` counts the model's weights (``rope_freqs`` is not one);
    ``tensor_bytes`` counts every tensor in the file.
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
    # F32 as llama.cpp's converter forces them: 1-D tensors and the GPT-2 position table.
    if w.ndim == 1 or name == "position_embd.weight":
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
    """Write ``model`` (llama, qwen2, qwen3, gemma2, gemma3 or gpt2, any layer count) and its
    tokenizer.

    The file is written next to ``path`` under a temporary name and renamed into place.

    Args:
        gguf_type: one of ``distill.names.GGUF_TYPES`` for the 2-D weights.
        include_embeddings: quantize the embedding (and tied head); false keeps it F16.
        name: ``general.name`` (defaults to the file's stem).
        int4_groups: ``q4_0`` only: GPTQ groups (group size 32) per ``nn.Linear`` module
            name, written as they are instead of the gguf package's rounding
            (:mod:`distill.quantize.gptq`).
        embedding_bits: 8 writes the embedding of a ``q4_0``/``q4_1`` file as ``q8_0``.

    Raises:
        GGUFExportError: see :func:`check_exportable` and :func:`tokenizer_metadata`; a
            state-dict tensor the arch's llama.cpp loader has no slot for; GPTQ groups whose
            shape is not the weight's.
    """
    import gguf

    if gguf_type not in GGUF_TYPES:
        raise GGUFExportError(f"unknown GGUF type {gguf_type!r}: choose from {GGUF_TYPES}")
    check_exportable(model.config)
    arch = layout(model.config)
    tok = tokenizer_metadata(tokenizer, int(model.config.vocab_size))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{process_tag()}")
    writer = gguf.GGUFWriter(str(tmp), arch.arch)
    writer.add_name(name or path.stem)
    add_model_metadata(writer, model.config)
    writer.add_file_type(_file_type(gguf_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_tokenizer_metadata(writer, tok)
    result = GGUFExport(path=path, gguf_type=gguf_type, tensor_types={}, tensor_bytes=0, params=0)
    _add_tensors(writer, model, arch, result, include_embeddings, int4_groups or {}, embedding_bits)
    for out_name, data in extra_tensors(model.config).items():  # F32, not model weights
        writer.add_tensor(out_name, data)
        result.tensor_types[out_name] = "f32"
        result.tensor_bytes += int(data.nbytes)
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


def _encode(
    hf_name: str, w: np.ndarray, kind: str, groups: Int4Groups | None, rope_heads: int | None
) -> tuple[np.ndarray, np.ndarray, Any]:
    """``w`` as stored in the file: (data, the values a reader gets back, GGML raw dtype or
    None for plain f32/f16). ``w`` is in file layout, ``groups`` rows in Hugging Face order.

    Raises:
        GGUFExportError: ``groups`` not of 32 values, or not shaped like ``w``.
    """
    import gguf

    if kind == "f32":
        return w, w, None
    if kind == "f16":
        data = w.astype(np.float16)
        return data, data.astype(np.float32), None
    if kind == "q4_0" and groups is not None:
        if groups.group_size != BLOCK_VALUES or tuple(groups.levels.shape) != w.shape:
            raise GGUFExportError(
                f"{hf_name}: Q4_0 needs groups of {BLOCK_VALUES} shaped {w.shape}, got "
                f"{groups.group_size}-value groups shaped {tuple(groups.levels.shape)}"
            )
        levels, scales = groups.levels.numpy(), groups.scales.numpy()
        if rope_heads:  # rows move together with their groups
            levels = permute_rope_rows(levels, rope_heads)
            scales = permute_rope_rows(scales, rope_heads)
        data = pack_q4_0(Int4Groups(torch.from_numpy(levels), torch.from_numpy(scales)))
    else:
        data = gguf.quants.quantize(w, _qtype(kind))
    return data, gguf.quants.dequantize(data, _qtype(kind)), _qtype(kind)


def _file_layout(
    model: PreTrainedModel, arch: ArchLayout, hf_name: str, ndim: int
) -> tuple[int | None, bool]:
    """How a state-dict tensor is reordered for the file: (RoPE heads to permute its rows by,
    or None; whether it is a Conv1D ``(in, out)`` weight to transpose)."""
    from transformers.pytorch_utils import Conv1D

    n_heads, n_kv, _ = heads(model.config)
    rope_heads = None
    if arch.permute_qk and hf_name.rsplit(".", 1)[0].endswith("self_attn.q_proj"):
        rope_heads = n_heads
    elif arch.permute_qk and hf_name.rsplit(".", 1)[0].endswith("self_attn.k_proj"):
        rope_heads = n_kv
    conv1d = ndim == 2 and isinstance(model.get_submodule(hf_name.rsplit(".", 1)[0]), Conv1D)
    return rope_heads, conv1d


def _add_tensors(
    writer: Any,
    model: PreTrainedModel,
    arch: ArchLayout,
    result: GGUFExport,
    include_embeddings: bool,
    int4_groups: dict[str, Int4Groups],
    embedding_bits: int,
) -> None:
    """Every weight of ``model`` into ``writer``; ``result`` records types, bytes and the
    dequantized reference weights (under Hugging Face names, in Hugging Face layout)."""
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    state = model.state_dict()
    for hf_name, tensor in state.items():
        if hf_name == "lm_head.weight" and tied:
            continue  # absent output.weight = tied, for llama.cpp and transformers alike
        out_name = gguf_name(arch, hf_name)
        w = tensor.detach().to(torch.float32).cpu().numpy()
        rope_heads, conv1d = _file_layout(model, arch, hf_name, w.ndim)
        if conv1d:
            w = np.ascontiguousarray(w.T)
        if rope_heads:
            w = permute_rope_rows(w, rope_heads)
        shift = norm_shift(arch, out_name)
        w = w + shift if shift else w
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
        if conv1d:
            back = back.T
        back = back - shift if shift else back
        result.reference_state[hf_name] = torch.from_numpy(np.ascontiguousarray(back))
        result.tensor_types[out_name] = kind
        result.tensor_bytes += int(data.nbytes)
        result.params += int(w.size)
    if tied and "lm_head.weight" in state:
        result.reference_state["lm_head.weight"] = result.reference_state[_embedding_key(arch)]


def read_export(model: PreTrainedModel, path: Path, gguf_type: str) -> GGUFExport:
    """What a GGUF file of ``model`` holds, as :func:`export_gguf` reports it: for a file
    another writer made from our F16 export (llama.cpp's quantizer). Each tensor's type is the
    file's own (a k-quant mix falls back per tensor), and ``reference_state`` is the file's
    weights dequantized by the ``gguf`` package, back under Hugging Face names and layout.

    Raises:
        GGUFExportError: the file lacks a weight of ``model`` or holds one of another shape.
    """
    import gguf

    arch = layout(model.config)
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    result = GGUFExport(
        path=Path(path), gguf_type=gguf_type, tensor_types={}, tensor_bytes=0, params=0
    )
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    state = model.state_dict()
    for hf_name, tensor in state.items():
        if hf_name == "lm_head.weight" and tied:
            continue
        out_name = gguf_name(arch, hf_name)
        if out_name not in tensors:
            raise GGUFExportError(f"{path} has no {out_name} (the model's {hf_name})")
        t = tensors[out_name]
        back = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        rope_heads, conv1d = _file_layout(model, arch, hf_name, tensor.dim())
        shape = tuple(tensor.T.shape) if conv1d else tuple(tensor.shape)
        if back.size != tensor.numel():
            raise GGUFExportError(f"{path}: {out_name} holds {back.size} values, not {shape}")
        back = back.reshape(shape)
        if rope_heads:
            back = unpermute_rope_rows(back, rope_heads)
        if conv1d:
            back = back.T
        shift = norm_shift(arch, out_name)
        back = back - shift if shift else back
        result.reference_state[hf_name] = torch.from_numpy(np.array(back, copy=True, order="C"))
        result.params += int(tensor.numel())
    for t in reader.tensors:
        result.tensor_types[t.name] = t.tensor_type.name.lower()
        result.tensor_bytes += int(t.n_bytes)
    if tied and "lm_head.weight" in state:
        result.reference_state["lm_head.weight"] = result.reference_state[_embedding_key(arch)]
    return result


def _embedding_key(arch: ArchLayout) -> str:
    """The state-dict key of the token embedding (the tied head's weight) under ``arch``."""
    return next(k for k, v in arch.top.items() if v == "token_embd.weight")


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
