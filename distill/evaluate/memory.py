"""What decoding must read per token, and how fast this machine can read it.

Decoding one token reads every weight once and the KV cache of every earlier position, so
``tokens/s ≤ bandwidth ÷ bytes read per token``. At batch ``b`` one pass over the weights
serves ``b`` tokens while each sequence still reads its own cache:

    bound(b) = b · bandwidth ÷ (weight_bytes + b · kv_bytes_per_token · context)

``context`` is the mean number of cached positions during the measured decode.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch


def kv_cache_bytes_per_token(config: Any, dtype_bytes: int = 4) -> int:
    """Bytes of K and V one token adds to the cache: layers × kv heads × head dim × 2 × dtype.

    Reads llama-style names (``num_key_value_heads``, ``head_dim``) and falls back to the
    attention head count and ``hidden_size // num_attention_heads`` (GPT-2 maps its own
    names onto these through ``attribute_map``).
    """
    layers = int(config.num_hidden_layers)
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = getattr(config, "head_dim", None) or int(config.hidden_size) // heads
    return layers * kv_heads * int(head_dim) * 2 * dtype_bytes


@dataclass
class MemoryModel:
    weight_bytes: int
    kv_bytes_per_token: int
    context_tokens: int
    batch_size: int

    @property
    def kv_cache_bytes(self) -> int:
        return self.kv_bytes_per_token * self.context_tokens * self.batch_size

    @property
    def total_bytes(self) -> int:
        """Weights plus a full KV cache for ``batch_size`` sequences of ``context_tokens``."""
        return self.weight_bytes + self.kv_cache_bytes


def decode_bound_tokens_per_s(
    bandwidth_bytes_per_s: float,
    weight_bytes: int,
    kv_bytes_per_token: int,
    mean_context: float,
    batch_size: int = 1,
) -> float:
    """Upper bound on decode tokens/s (all sequences together) set by memory bandwidth."""
    per_step = weight_bytes + batch_size * kv_bytes_per_token * mean_context
    return batch_size * bandwidth_bytes_per_s / per_step


COPY_BYTES = 256 * 2**20
COPY_REPEATS = 7
# How measure_bandwidth's figure is made, as the reports state it.
BANDWIDTH_METHOD = (
    f"median of {COPY_REPEATS} copies of a {COPY_BYTES // 2**20} MiB fp32 tensor, "
    "read + write bytes"
)


def measure_bandwidth(
    num_bytes: int = COPY_BYTES, repeats: int = COPY_REPEATS, device: torch.device | str = "cpu"
) -> float:
    """Copy bandwidth in bytes/s (read + write counted), median over ``repeats`` copies.

    The buffer is far larger than any cache, so the copy streams from main memory, the way
    decoding streams the weights.
    """
    device = torch.device(device)
    src = torch.ones(num_bytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up: fault in both buffers
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return 2 * src.numel() * 4 / statistics.median(times)
