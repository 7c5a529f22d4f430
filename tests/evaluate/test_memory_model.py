"""The KV-cache formula against a real cache, and the bandwidth bound's arithmetic."""

from __future__ import annotations

import pytest
import torch

from distill.evaluate.memory import (
    MemoryModel,
    decode_bound_tokens_per_s,
    kv_cache_bytes_per_token,
    measure_bandwidth,
)
from tests.conftest import tiny_gpt2, tiny_llama


def real_cache_bytes(model, tokens: int, batch: int) -> int:
    ids = torch.randint(0, 64, (batch, tokens))
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    total = 0
    for layer in cache.layers:
        total += layer.keys.numel() * layer.keys.element_size()
        total += layer.values.numel() * layer.values.element_size()
    return total


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_kv_formula_matches_real_cache(make) -> None:
    model = make(64, layers=3)
    tokens, batch = 7, 2
    per_token = kv_cache_bytes_per_token(model.config, dtype_bytes=4)
    assert per_token * tokens * batch == real_cache_bytes(model, tokens, batch)


def test_llama_formula_by_hand() -> None:
    cfg = tiny_llama(64, layers=2).config  # 2 layers, 2 kv heads, head dim 32/4 = 8
    assert kv_cache_bytes_per_token(cfg, dtype_bytes=2) == 2 * 2 * 8 * 2 * 2


def test_memory_model_totals_and_bound() -> None:
    m = MemoryModel(weight_bytes=1000, kv_bytes_per_token=10, context_tokens=50, batch_size=4)
    assert m.kv_cache_bytes == 2000 and m.total_bytes == 3000
    # batch 1: 1e6 B/s over (1000 + 10*50) bytes; batch 4 reads the weights once for 4 tokens
    assert decode_bound_tokens_per_s(1e6, 1000, 10, 50, 1) == pytest.approx(1e6 / 1500)
    assert decode_bound_tokens_per_s(1e6, 1000, 10, 50, 4) == pytest.approx(4e6 / 3000)


def test_bandwidth_is_measured() -> None:
    bw = measure_bandwidth(num_bytes=16 * 2**20, repeats=3)
    assert 1e8 < bw < 1e13  # between 0.1 GB/s and 10 TB/s: a real number, not a constant
