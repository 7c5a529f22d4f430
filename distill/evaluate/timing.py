"""How every PyTorch timing in the report is taken: warm-up, synchronised wall clock, median.

Shared by the eager timings (:mod:`distill.evaluate.speed`) and the compiled decode
(:mod:`distill.evaluate.compiled_decode`), which import it and not each other.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch


def median_rate(num_items: int, seconds: Sequence[float]) -> float:
    """``num_items`` per second at the median of ``seconds`` (robust to one slow run)."""
    return num_items / max(statistics.median(seconds), 1e-12)


def sync(device: torch.device) -> None:
    """Wait for the device's queued kernels (CUDA runs them asynchronously); no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_runs(
    fn: Callable[[], object],
    repeats: int,
    device: torch.device,
    warmup: Callable[[], object] | None = None,
    budget_s: float | None = None,
) -> list[float]:
    """Wall seconds of up to ``repeats`` calls of ``fn`` after one untimed warm-up call (of
    ``warmup`` when given: a shorter run through the same kernels). With ``budget_s``, no
    further call once the timed ones took that long together: a run of many seconds is its
    own average over many steps, and repeating it adds minutes, not accuracy."""
    (warmup or fn)()
    times: list[float] = []
    for _ in range(repeats):
        if budget_s is not None and times and sum(times) >= budget_s:
            break
        sync(device)
        t0 = time.perf_counter()
        fn()
        # CUDA kernels run asynchronously; without this the clock stops at launch.
        sync(device)
        times.append(time.perf_counter() - t0)
    return times
