"""GGUF types made by llama.cpp's own quantizer (distill/quantize/llama_quant.py).

The models here are 256 wide (rows of whole 256-value k-quant blocks), so the files hold real
k-quant tensors, not the per-tensor fallbacks a 576-wide SmolLM2 student gets.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGUFReader

from distill.quantize.gguf import export_gguf, gguf_tensor_bytes, read_export, reference_model
from distill.quantize.llama_quant import importance_matrix, llama_quantize
from tests.quantize.gguf_models import arch_model, pre_tokenized
from tests.quantize.test_gguf_llama_cpp import IDS, hf_logits, llama_cpp_logits, max_delta

WIDE = {"hidden_size": 256, "intermediate_size": 512}
# llama.cpp against the float model carrying the file's dequantized weights, max |dlogit| on
# these 256-wide models (logits up to 7.8): q4_k_m 0.20-0.61, q6_k 0.36, and distill's own
# Q8_0 0.28 (llama.cpp quantizes activations to 8 bits per block, more error in wider rows).
# The float model itself is 1.6-4.0 away: the reference must be far closer than that.
MAX_DELTA_VS_REFERENCE = 0.75


@pytest.fixture(scope="module")
def tokenizer():
    return pre_tokenized("gpt2", vocab_size=300)


@pytest.mark.parametrize(
    "arch,tie,gguf_type,k_type",
    [
        ("llama3", False, "q4_k_m", "q4_k"),  # q/k rows permuted for RoPE
        ("qwen2", True, "q4_k_m", "q4_k"),
        ("gpt2", True, "q4_k_m", "q4_k"),  # Conv1D weights transposed
        ("llama3", True, "q6_k", "q6_k"),
    ],
)
def test_llama_made_file_is_read_back_as_llama_cpp_runs_it(
    tmp_path, tokenizer, arch: str, tie: bool, gguf_type: str, k_type: str
) -> None:
    model = arch_model(arch, len(tokenizer), tie=tie, **WIDE)
    source = export_gguf(model, tokenizer, tmp_path / "f16.gguf", "f16").path
    dst = tmp_path / f"{gguf_type}.gguf"
    llama_quantize(source, dst, gguf_type, threads=1)
    export = read_export(model, dst, gguf_type)
    assert k_type in export.tensor_types.values(), export.tensor_types
    assert export.tensor_bytes == gguf_tensor_bytes(dst)
    reference = reference_model(model, export)
    got = llama_cpp_logits(dst, IDS)
    assert max_delta(got, hf_logits(reference, IDS)) < MAX_DELTA_VS_REFERENCE
    # The file is quantized: the float model is several times further from llama.cpp.
    assert max_delta(got, hf_logits(model, IDS)) > 3 * max_delta(got, hf_logits(reference, IDS))


def test_importance_matrix_is_each_layers_mean_squared_input(tokenizer) -> None:
    model = arch_model("llama3", len(tokenizer), tie=True, **WIDE)
    blocks = torch.tensor([IDS[:40], IDS[40:80], IDS[10:50]])
    imatrix = importance_matrix(model, blocks, batch_size=2)
    # 2 layers x 7 linears; a tied head has no output.weight to weigh.
    assert len(imatrix) == 14 and "output.weight" not in imatrix
    seen = []
    hook = model.model.layers[1].mlp.down_proj.register_forward_pre_hook(
        lambda m, args: seen.append(args[0].reshape(-1, args[0].shape[-1]))
    )
    with torch.inference_mode():
        model(input_ids=blocks)
    hook.remove()
    want = (torch.cat(seen) ** 2).mean(0).numpy()
    np.testing.assert_allclose(imatrix["blk.1.ffn_down.weight"], want, rtol=1e-4)


def test_the_importance_matrix_reaches_the_quantizer(tmp_path, tokenizer) -> None:
    model = arch_model("llama3", len(tokenizer), tie=True, **WIDE)
    source = export_gguf(model, tokenizer, tmp_path / "f16.gguf", "f16").path
    blocks = torch.tensor([IDS[:48], IDS[48:]])
    imatrix = importance_matrix(model, blocks)
    # Weigh one input channel of every layer far above the rest: its rounding must change.
    skewed = {
        n: np.where(np.arange(v.size) == 3, 1e6, 1e-6).astype(np.float32)
        for n, v in imatrix.items()
    }
    plain, weighted = tmp_path / "plain.gguf", tmp_path / "weighted.gguf"
    llama_quantize(source, plain, "q4_k_m", threads=1)
    llama_quantize(source, weighted, "q4_k_m", threads=1, imatrix=skewed)

    def data(path) -> bytes:
        (t,) = [t for t in GGUFReader(str(path)).tensors if t.name == "blk.0.ffn_up.weight"]
        return bytes(t.data)

    assert data(plain) != data(weighted)
    # Sized wrong for a tensor, llama.cpp refuses it, and the error says which file and type.
    bad = {**imatrix, "blk.0.ffn_up.weight": np.ones(7, dtype=np.float32)}
    with pytest.raises(Exception, match="could not quantize .*q4_k_m"):
        llama_quantize(source, tmp_path / "bad.gguf", "q4_k_m", threads=1, imatrix=bad)
