"""What the GGUF writer refuses, the tensors it maps, Llama 3's RoPE factors and the
pre-tokenizer names, checked without running a model."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from transformers import (
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    GPT2Config,
    LlamaConfig,
    Qwen2Config,
    Qwen3Config,
)

from distill.errors import DistillError
from distill.quantize.gguf_arch import (
    LAYOUTS,
    GGUFExportError,
    check_exportable,
    gguf_name,
    llama3_rope_factors,
    rope_parameters,
)
from distill.quantize.gguf_tokenizer import LLAMA3_SPLIT, QWEN2_SPLIT, pre_tokenizer_name
from tests.quantize.gguf_models import LLAMA3_ROPE, arch_model

_SMALL = dict(vocab_size=64, hidden_size=32, num_attention_heads=4, num_key_value_heads=2)


@pytest.mark.parametrize(
    "config,key",
    [
        (GemmaConfig(**_SMALL, head_dim=8), "model_type"),
        (LlamaConfig(**_SMALL, rope_parameters={"rope_type": "yarn", "factor": 4.0}), "rope_type"),
        (LlamaConfig(**_SMALL, hidden_act="gelu"), "hidden_act"),
        (Qwen2Config(**_SMALL, use_sliding_window=True, max_window_layers=0), "use_sliding_window"),
        (Qwen2Config(**_SMALL, head_dim=16), "head_dim"),
        (Qwen3Config(**_SMALL, head_dim=16, attention_bias=True), "attention_bias"),
        (Gemma3TextConfig(**_SMALL, final_logit_softcapping=30.0), "final_logit_softcapping"),
        (Gemma3TextConfig(**_SMALL, head_dim=8, query_pre_attn_scalar=64), "query_pre_attn"),
        (Gemma3TextConfig(**_SMALL, hidden_activation="gelu"), "hidden_activation"),
        (
            Gemma3TextConfig(**_SMALL, num_hidden_layers=2, layer_types=["full_attention"] * 2),
            "no sliding",
        ),
        (Gemma2Config(**_SMALL, head_dim=8, final_logit_softcapping=None), "final_logit_soft"),
        (Gemma2Config(**_SMALL, head_dim=8, attn_logit_softcapping=None), "attn_logit_soft"),
        (
            Gemma2Config(
                **_SMALL, head_dim=8, num_hidden_layers=2, layer_types=["full_attention"] * 2
            ),
            "no sliding",
        ),
        (Gemma2Config(**_SMALL, head_dim=8, query_pre_attn_scalar=64), "query_pre_attn"),
        (GPT2Config(n_embd=32, n_head=4, activation_function="relu"), "activation_function"),
        (GPT2Config(n_embd=32, n_head=4, scale_attn_by_inverse_layer_idx=True), "inverse_layer"),
    ],
    ids=lambda v: v if isinstance(v, str) else v.model_type,
)
def test_what_llama_cpp_would_compute_differently_is_refused(config, key: str) -> None:
    with pytest.raises(GGUFExportError, match="quant.gguf=\\[\\]") as err:
        check_exportable(config)
    assert key in str(err.value)
    assert isinstance(err.value, DistillError)


@pytest.mark.parametrize("arch", ["llama3", "qwen2", "qwen3", "gemma2", "gemma3", "gpt2"])
def test_supported_architectures_pass_and_map_every_tensor(arch: str) -> None:
    model = arch_model(arch, 64)
    check_exportable(model.config)
    layout = LAYOUTS[model.config.model_type]
    names = [gguf_name(layout, k) for k in model.state_dict()]
    assert len(set(names)) == len(names)  # no two weights land on one tensor


def test_a_tensor_the_arch_does_not_load_is_refused() -> None:
    # llama.cpp would refuse the whole file ("wrong number of tensors"); we refuse the name.
    for model_type, key in [
        ("qwen2", "model.layers.0.self_attn.o_proj.bias"),  # qwen2's loader has no wo bias
        ("qwen3", "model.layers.0.self_attn.q_proj.bias"),
        ("llama", "model.layers.0.self_attn.q_norm.weight"),
        ("gemma3_text", "model.layers.0.self_attn.q_proj.bias"),
        ("gpt2", "transformer.h.0.attn.bias"),  # the causal-mask buffer of older transformers
    ]:
        with pytest.raises(GGUFExportError, match=LAYOUTS[model_type].arch):
            gguf_name(LAYOUTS[model_type], key)


def test_llama3_factors_turn_default_rope_into_transformers_llama3() -> None:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    # The tests' llama3 model: head_dim 16, theta 5e4, an original context of 64 positions.
    config = LlamaConfig(**{**_SMALL, "hidden_size": 64}, rope_parameters=dict(LLAMA3_ROPE))
    head_dim = 16
    base = 5e4 ** -(torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    hf, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    factors = llama3_rope_factors(rope_parameters(config), head_dim)
    assert factors.shape == (head_dim // 2,) and factors.dtype == np.float32
    # GGML divides each frequency by its factor: that must give transformers' frequencies.
    np.testing.assert_allclose(base.numpy() / factors, hf.double().numpy(), rtol=1e-6)
    # All three bands occur: unscaled (1), fully scaled (factor 8) and the blend between.
    assert factors[0] == 1.0 and factors[-1] == 8.0 and 1 < factors[1] < 8, factors


def _split(regex: str) -> dict:
    return {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False},
        ],
    }


def test_pre_tokenizer_names(caplog) -> None:
    assert pre_tokenizer_name(_split(LLAMA3_SPLIT), ignore_merges=True) == "llama-bpe"
    # The same regex without ignore_merges: llama.cpp's name for that is smaug-bpe.
    assert pre_tokenizer_name(_split(LLAMA3_SPLIT), ignore_merges=False) == "smaug-bpe"
    assert pre_tokenizer_name(_split(QWEN2_SPLIT)) == "qwen2"
    assert pre_tokenizer_name({"type": "ByteLevel", "use_regex": True}) == "gpt-2"
    with caplog.at_level(logging.WARNING):
        assert pre_tokenizer_name(_split(QWEN2_SPLIT), ignore_merges=True) == "default"
        assert pre_tokenizer_name(_split(r"\p{N}{1,2}")) == "default"
    assert caplog.text.count("writing 'default'") == 2


def test_a_sentencepiece_tokenizer_that_splits_words_first_is_refused() -> None:
    # llama.cpp's SentencePiece merging runs over the whole text; a tokenizer that splits at
    # spaces first never merges across them, so the two would give different ids.
    from tokenizers import pre_tokenizers

    from distill.quantize.gguf_tokenizer import tokenizer_metadata
    from tests.quantize.gguf_models import sentencepiece_tokenizer

    tok = sentencepiece_tokenizer(300)
    assert tokenizer_metadata(tok, len(tok))["model"] == "llama"
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(split=True)
    with pytest.raises(GGUFExportError, match="splits text into words"):
        tokenizer_metadata(tok, len(tok))
