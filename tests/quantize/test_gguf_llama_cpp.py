"""GGUF files run by llama.cpp itself (llama-cpp-python), one per supported architecture.

Each microscopic model is exported, loaded by llama.cpp (which refuses a missing, extra or
misshapen tensor), and its per-token logits compared with transformers' on the same ids:
the F16 file with the float model, every file with :func:`reference_model` (the float model
carrying the file's dequantized weights). The embedded tokenizer must give the HF ids.
"""

from __future__ import annotations

import dataclasses

import gguf
import llama_cpp
import numpy as np
import pytest
import torch

import distill.quantize.gguf as gguf_mod
from distill.quantize import gguf_arch
from distill.quantize.gguf import export_gguf, gguf_tensor_bytes, reference_model
from tests.quantize.gguf_models import (
    TOKENIZER_TEXT,
    arch_model,
    pre_tokenized,
    sentencepiece_tokenizer,
)

# Measured on these models (max |logit| up to 4.4; seeds 0-4, tied and untied, 96 tokens,
# all four archs, 40 models per type): llama.cpp's F16 file against transformers fp32 at most
# 7.3e-3 (its F16 matmuls round activations to f16). Against the reference model: F16
# 5.7e-3, Q8_0 9.0e-2, Q4_0 9.5e-2, since llama.cpp quantizes activations to 8-bit blocks
# inside its quantized dot products. The bounds are 2.2-2.7x those worst cases.
MAX_DELTA_F16_VS_TRANSFORMERS = 0.02
MAX_DELTA_VS_REFERENCE = {"f16": 0.02, "q8_0": 0.2, "q4_0": 0.25}
# A layout slip (q/k permuted for qwen or not for llama, rope_freqs left out; Gemma 3's norms
# not shifted, its sliding pattern lost) measured 1.7 to 3.6 on seeds 0-2: far outside every
# bound above. Gemma 3 (seed 0, 4 layers): F16 8.1e-3 from transformers, Q8_0 and Q4_0 0.10
# from the reference, inside the same bounds.
LAYOUT_SLIP = 1.0
CONTEXT = 256
IDS = [int(i) for i in np.arange(96) * 37 % 300]  # spread over the 300-token vocabulary


@pytest.fixture(scope="module")
def tokenizer():
    return pre_tokenized("gpt2", vocab_size=300)


@pytest.fixture(scope="module")
def spm_tokenizer():
    return sentencepiece_tokenizer(vocab_size=400)


def llama_cpp_logits(path, ids: list[int]) -> np.ndarray:
    """``(len(ids), V)`` logits llama.cpp computes for ``ids`` from the file at ``path``."""
    llm = llama_cpp.Llama(
        model_path=str(path),
        logits_all=True,
        n_ctx=CONTEXT,
        n_threads=1,
        n_threads_batch=1,
        verbose=False,
    )
    try:
        llm.reset()
        llm.eval(ids)
        return np.array(llm.scores[: llm.n_tokens])
    finally:
        llm.close()


def hf_logits(model, ids: list[int]) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def max_delta(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max())


@pytest.mark.parametrize("gguf_type", ["f16", "q8_0", "q4_0"])
@pytest.mark.parametrize(
    "arch,tie",
    [
        ("llama3", False),
        ("qwen2", True),
        ("qwen3", True),
        ("gemma2", True),
        ("gemma3", True),
        ("gpt2", True),
    ],
)
def test_llama_cpp_reproduces_each_architecture(
    tmp_path, tokenizer, spm_tokenizer, arch: str, tie: bool, gguf_type: str
) -> None:
    # Gemma 3 with its own kind of tokenizer (SentencePiece-style, written as GGUF "llama").
    tokenizer = spm_tokenizer if arch.startswith("gemma") else tokenizer
    model = arch_model(arch, len(tokenizer), tie=tie, context=CONTEXT, layers=4)
    export = export_gguf(model, tokenizer, tmp_path / f"{arch}-{gguf_type}.gguf", gguf_type)
    got = llama_cpp_logits(export.path, IDS)
    if gguf_type == "f16":
        assert max_delta(got, hf_logits(model, IDS)) < MAX_DELTA_F16_VS_TRANSFORMERS
    reference = hf_logits(reference_model(model, export), IDS)
    assert max_delta(got, reference) < MAX_DELTA_VS_REFERENCE[gguf_type]
    assert ("output.weight" in export.tensor_types) is not tie
    assert ("rope_freqs.weight" in export.tensor_types) is (arch == "llama3")
    assert export.tensor_bytes == gguf_tensor_bytes(export.path)


def test_a_gemma2_cut_runs_its_own_sliding_pattern(tmp_path, spm_tokenizer) -> None:
    # llama.cpp's gemma2 graph reads the written pattern (without it, every other layer from
    # the first slides): a cut keeping [full, sliding, sliding, full] layers runs as it is.
    pattern = ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]
    model = arch_model("gemma2", len(spm_tokenizer), layers=4, layer_types=pattern)
    export = export_gguf(model, spm_tokenizer, tmp_path / "cut.gguf", "f16")
    got = llama_cpp_logits(export.path, IDS)
    assert max_delta(got, hf_logits(model, IDS)) < MAX_DELTA_F16_VS_TRANSFORMERS


def test_llama_biases_are_permuted_with_their_rows(tmp_path, tokenizer) -> None:
    # Llama with attention_bias/mlp_bias: q/k biases follow their rows' RoPE permutation.
    model = arch_model("llama3", len(tokenizer), attention_bias=True, mlp_bias=True)
    export = export_gguf(model, tokenizer, tmp_path / "bias.gguf", "f16")
    assert {"blk.0.attn_q.bias", "blk.0.attn_output.bias", "blk.0.ffn_up.bias"} <= set(
        export.tensor_types
    )
    got = llama_cpp_logits(export.path, IDS)
    assert max_delta(got, hf_logits(model, IDS)) < MAX_DELTA_F16_VS_TRANSFORMERS


@pytest.mark.parametrize(
    "arch,slip",
    [
        ("qwen2", "permute"),
        ("qwen3", "permute"),
        ("llama3", "no-permute"),
        ("llama3", "no-freqs"),
        ("gemma3", "no-norm-shift"),
        ("gemma3", "all-sliding"),
        ("gemma2", "no-norm-shift"),
        ("gemma2", "no-softcaps"),
        ("gemma2", "all-sliding"),
    ],
)
def test_a_layout_slip_is_far_outside_the_tolerance(
    tmp_path, tokenizer, monkeypatch, arch: str, slip: str
) -> None:
    # The check above can fail: each of these plausible mistakes moves logits by units.
    model = arch_model(arch, len(tokenizer), layers=4)
    model_type = model.config.model_type
    if slip == "no-freqs":
        monkeypatch.setattr(gguf_mod, "extra_tensors", lambda config: {})
    elif slip == "no-norm-shift":
        wrong = dataclasses.replace(gguf_arch.LAYOUTS[model_type], norm_shift=0.0)
        monkeypatch.setitem(gguf_arch.LAYOUTS, model_type, wrong)
    elif slip == "all-sliding":
        monkeypatch.setattr(gguf_arch, "sliding_pattern", lambda c: [True] * c.num_hidden_layers)
    elif slip == "no-softcaps":  # llama.cpp then caps at its own defaults, 50 and 30
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            monkeypatch.setattr(gguf.GGUFWriter, f"add_{key}", lambda *a: None)
    else:
        wrong = dataclasses.replace(gguf_arch.LAYOUTS[model_type], permute_qk=slip == "permute")
        monkeypatch.setitem(gguf_arch.LAYOUTS, model_type, wrong)
    export = export_gguf(model, tokenizer, tmp_path / "slip.gguf", "f16")
    assert max_delta(llama_cpp_logits(export.path, IDS), hf_logits(model, IDS)) > LAYOUT_SLIP


# kind -> (llama.cpp pre-tokenizer name written, a neighbour's name that splits differently)
PRE_TYPES = {
    "llama3": ("llama-bpe", "qwen2"),  # digits: runs of up to three vs one at a time
    "qwen2": ("qwen2", "llama-bpe"),
    "smollm": ("smollm", "gpt-2"),  # digits: one at a time vs whole runs
    "gpt2": ("gpt-2", "smollm"),
}


def _llama_cpp_ids(path, text: str) -> list[int]:
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        return llm.tokenize(text.encode(), add_bos=False, special=True)
    finally:
        llm.close()


@pytest.mark.parametrize("kind", list(PRE_TYPES))
def test_llama_cpp_tokenizes_as_the_source_tokenizer(tmp_path, monkeypatch, kind: str) -> None:
    tok = pre_tokenized(kind)
    model = arch_model("qwen2", len(tok))
    export = export_gguf(model, tok, tmp_path / f"{kind}.gguf", "f16")
    expected = tok(TOKENIZER_TEXT)["input_ids"]
    assert _llama_cpp_ids(export.path, TOKENIZER_TEXT) == expected
    # The text tells the pre-tokenizers apart: under the neighbour's name the ids differ.
    right, neighbour = PRE_TYPES[kind]
    real = gguf_mod.tokenizer_metadata
    assert real(tok, len(tok))["pre"] == right
    monkeypatch.setattr(
        gguf_mod, "tokenizer_metadata", lambda t, n: {**real(t, n), "pre": neighbour}
    )
    wrong = export_gguf(model, tok, tmp_path / f"{kind}-as-{neighbour}.gguf", "f16")
    assert _llama_cpp_ids(wrong.path, TOKENIZER_TEXT) != expected


def test_llama_cpp_tokenizes_as_a_sentencepiece_tokenizer(
    tmp_path, monkeypatch, spm_tokenizer
) -> None:
    # Gemma's kind: spaces as "▁", characters outside the vocabulary as <0xNN> bytes, merges
    # across words, <bos> prepended. The scores must make llama.cpp merge in BPE's order.
    text = TOKENIZER_TEXT + " \u00fcn\u00efc\u00f8d\u00e9 \U0001f600, tabs\t\tand  two  spaces"
    model = arch_model("gemma3", len(spm_tokenizer), layers=2)
    export = export_gguf(model, spm_tokenizer, tmp_path / "spm.gguf", "f16")
    expected = spm_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert any(spm_tokenizer.convert_ids_to_tokens(i).startswith("<0x") for i in expected)
    assert _llama_cpp_ids(export.path, text) == expected
    real = gguf_mod.tokenizer_metadata
    meta = real(spm_tokenizer, len(spm_tokenizer))
    assert (meta["model"], meta["add_bos"], meta["add_space_prefix"]) == ("llama", True, False)
    # Scores in vocabulary order instead of merge order: llama.cpp merges differently.
    monkeypatch.setattr(
        gguf_mod,
        "tokenizer_metadata",
        lambda t, n: {**real(t, n), "scores": [float(i) for i in range(n)]},
    )
    wrong = export_gguf(model, spm_tokenizer, tmp_path / "spm-wrong.gguf", "f16")
    assert _llama_cpp_ids(wrong.path, text) != expected


@pytest.mark.parametrize("arch", ["llama3", "qwen2", "gpt2"])
def test_int4_groups_are_written_as_they_are(tmp_path, tokenizer, arch: str) -> None:
    # GPTQ's groups (here RTN ones: the same format) on every Linear but the tied head; for
    # llama they move with their rows' RoPE permutation, for qwen2 not; GPT-2 as the stage
    # quantizes it, Conv1D rewritten as Linear (which the writer then must not transpose).
    from torch import nn

    from distill.models.conv1d import conv1d_to_linear
    from distill.quantize.gptq import rtn_int4

    model = arch_model(arch, len(tokenizer))
    if arch == "gpt2":
        conv1d_to_linear(model)
    embedding = model.get_input_embeddings().weight
    groups = {
        name: rtn_int4(m.weight, 32)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and m.weight is not embedding
    }
    export = export_gguf(model, tokenizer, tmp_path / "g.gguf", "q4_0", int4_groups=groups)
    assert export.calibrated == len(groups) > 0
    for name, g in groups.items():
        assert torch.equal(export.reference_state[f"{name}.weight"], g.dequantize())
    reference = hf_logits(reference_model(model, export), IDS)
    assert max_delta(llama_cpp_logits(export.path, IDS), reference) < MAX_DELTA_VS_REFERENCE["q4_0"]
