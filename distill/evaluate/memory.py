"""What decoding must read per token, how fast this machine can read it, and peak memory.

Decoding one token reads every weight once and the KV cache of every earlier position, so
``tokens/s ≤ bandwidth ÷ bytes read per token``. At batch ``b`` one pass over the weights
serves ``b`` tokens while each sequence still reads its own cache:

    bound(b) = b · bandwidth ÷ (weight_bytes + b · kv_bytes_per_token · context)

``context`` is the mean number of cached positions during the measured decode.

:class:`PeakMemory` measures how much memory a variant's load and held-out pass really took;
the evaluate stage closes its window before any timed run.
"""

from __future__ import annotations

import ctypes
import gc
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Any

import psutil
import torch

from distill.config import EvalConfig


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


def kv_dtype_bytes(model: Any) -> int:
    """Bytes per cached K/V value: the model's compute dtype (fp32 for weight-only int8/int4)."""
    return getattr(model, "dtype", torch.float32).itemsize


def add_memory_fields(
    row: dict[str, Any], cfg: EvalConfig, bandwidth_bytes_per_s: float | None
) -> None:
    """Memory model and bandwidth bound of one report row, in place.

    ``memory_model``: stored weight bytes + the KV cache of ``eval.memory_batch_size``
    sequences of ``eval.memory_context_tokens``, and whether that fits
    ``eval.memory_budget_bytes``. The bound uses the bytes decode actually reads in the row's
    runtime, the weights as loaded (a GGUF row: the file's tensor bytes, which llama.cpp
    computes on as stored), plus the mean cached context of the timed decode. A rate that
    was not measured (None) gets no ratio; a row whose file could not be read at all (no
    weight bytes) gets no memory model.
    """
    if row.get("weight_bytes") is None:
        return
    mm = MemoryModel(
        weight_bytes=int(row["weight_bytes"]),
        kv_bytes_per_token=int(row["kv_cache_bytes_per_token"]),
        context_tokens=cfg.memory_context_tokens,
        batch_size=cfg.memory_batch_size,
    )
    row["memory_model"] = {
        "context_tokens": mm.context_tokens,
        "batch_size": mm.batch_size,
        "weight_bytes": mm.weight_bytes,
        "kv_cache_bytes": mm.kv_cache_bytes,
        "total_bytes": mm.total_bytes,
        "budget_bytes": cfg.memory_budget_bytes,
        "fits_budget": None
        if cfg.memory_budget_bytes is None
        else mm.total_bytes <= cfg.memory_budget_bytes,
    }
    if bandwidth_bytes_per_s is None:
        return
    mean_context = row["prompt_tokens"] + (row["decode_tokens"] - 1) / 2
    loaded = int(row.get("loaded_weight_bytes") or row["weight_bytes"])
    kv = int(row["kv_cache_bytes_per_token"])
    bound = decode_bound_tokens_per_s(bandwidth_bytes_per_s, loaded, kv, mean_context)
    row["decode_bytes_per_token"] = loaded + kv * mean_context
    row["decode_bound_tokens_per_s"] = bound
    rate, deployed = row.get("decode_tokens_per_s"), row.get("deployed_decode_tokens_per_s")
    row["decode_bound_ratio"] = rate / bound if rate is not None else None
    row["deployed_decode_bound_ratio"] = deployed / bound if deployed is not None else None
    if row.get("decode_tokens_per_s_batch") is not None:
        b = int(row["decode_batch_size"])
        bound_b = decode_bound_tokens_per_s(bandwidth_bytes_per_s, loaded, kv, mean_context, b)
        row["decode_bound_tokens_per_s_batch"] = bound_b
        row["decode_bound_ratio_batch"] = row["decode_tokens_per_s_batch"] / bound_b
    if row.get("decode_compiled_tokens_per_s") is not None:
        row["decode_compiled_bound_ratio"] = row["decode_compiled_tokens_per_s"] / bound


def _release_freed_memory() -> None:
    """Return freed heap pages to the OS so the next RSS baseline is not inflated.

    glibc keeps freed arenas mapped; without ``malloc_trim`` a variant evaluated after a
    large one would start from a high RSS and show too little growth.
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): best effort only
        pass


_CLEAR_REFS = "/proc/self/clear_refs"
_STATUS = "/proc/self/status"


def _high_water_mark() -> int | None:
    """The kernel's peak RSS of this process since its last reset (``VmHWM``), in bytes."""
    try:
        with open(_STATUS) as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_high_water_mark() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0: ``5`` into ``clear_refs``)."""
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
    except OSError:
        return False
    return _high_water_mark() is not None


class PeakMemory:
    """Peak memory growth between :meth:`start` and :meth:`stop`.

    * CPU on Linux: the kernel's own high-water mark of the process RSS (``VmHWM``), reset at
      :meth:`start` (``/proc/self/clear_refs``): every page counted, and nothing runs beside
      the measured work. Where that file cannot be written, a daemon thread samples the RSS
      (``psutil``) every ``interval_s`` instead.
    * CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``,
      minus the bytes allocated at :meth:`start` (tensors only, not the caching
      allocator's reserve or the CUDA context).

    Memory the caller deliberately keeps (the teacher's log-probs, gathered during the
    window) is reported via :meth:`exclude` and subtracted: from each later sample, or, with
    the kernel's mark, from the peak (those bytes are all held at the window's end).
    """

    def __init__(self, device: torch.device, interval_s: float = 0.005) -> None:
        self.device = device
        self.interval_s = interval_s
        self._kernel = device.type != "cuda" and _reset_high_water_mark()
        self.method = (
            "cuda_max_memory_allocated_growth"
            if device.type == "cuda"
            else "cpu_peak_rss_growth (kernel high-water mark)"
            if self._kernel
            else f"cpu_peak_rss_growth (sampled every {interval_s * 1e3:.0f} ms)"
        )
        self._baseline = 0
        self._peak = 0
        self._excluded = 0
        self._running = False
        self._stop_event = threading.Event()
        self._thread: threading.Thread | None = None
        self._process = psutil.Process()

    def start(self) -> PeakMemory:
        _release_freed_memory()
        self._excluded = 0
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._baseline = torch.cuda.memory_allocated(self.device)
        elif self._kernel:
            _reset_high_water_mark()
            self._baseline = self._process.memory_info().rss
        else:
            self._baseline = self._process.memory_info().rss
            self._peak = self._baseline
            self._stop_event.clear()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        self._running = True
        return self

    def _sample(self) -> None:
        while not self._stop_event.is_set():
            self._record()
            self._stop_event.wait(self.interval_s)

    def _record(self) -> None:
        rss = self._process.memory_info().rss - self._excluded
        if rss > self._peak:
            self._peak = rss

    def exclude(self, num_bytes: int) -> None:
        """Do not count ``num_bytes`` allocated from now on (on CPU; ignored on CUDA)."""
        self._excluded += num_bytes

    def stop(self) -> int:
        """Stop measuring (idempotent) and return the peak growth in bytes."""
        if self._running:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
                self._peak = torch.cuda.max_memory_allocated(self.device)
            elif self._kernel:
                self._peak = (_high_water_mark() or self._baseline) - self._excluded
            else:
                self._record()
                self._stop_event.set()
                assert self._thread is not None
                self._thread.join()
            self._running = False
        return max(0, self._peak - self._baseline)
