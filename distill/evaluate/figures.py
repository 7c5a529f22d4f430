"""Readings of report rows that the report, its fidelity table and the frontier share: the
speed a row deploys at, which (size, loss) points are undominated, and how a figure prints."""

from __future__ import annotations

import math
from typing import Any


def deployed(v: dict[str, Any]) -> tuple[str, float | None, float | None]:
    """(runtime, decode tok/s, prefill tok/s) of a row in the runtime it deploys to.

    GGUF rows run in llama.cpp; torch rows in compiled PyTorch when their compiled decode was
    measured, else they have no deployed speed (None: their eager timings are diagnostics).
    Reports written before ``deployed_*`` fields existed fall back the same way.
    """
    if v.get("deployed_runtime"):
        return (
            v.get("runtime") or v["deployed_runtime"],
            v.get("deployed_decode_tokens_per_s"),
            v.get("deployed_prefill_tokens_per_s"),
        )
    if v.get("decode_compiled_tokens_per_s") is not None:
        return "torch.compile", v["decode_compiled_tokens_per_s"], v.get("prefill_tokens_per_s")
    return "PyTorch", None, None


def runtime_family(runtime: str) -> str:
    """``"llama.cpp 0.3.36"`` and ``"llama.cpp"`` are one runtime; so are torch.compile's."""
    return runtime.split()[0] if runtime else ""


def pareto_front(costs: list[tuple[float, float]]) -> list[bool]:
    """Whether each (size, loss) pair is undominated; both are minimised. NaN never wins."""
    flags = []
    for i, (a_size, a_loss) in enumerate(costs):
        if math.isnan(a_size) or math.isnan(a_loss):
            flags.append(False)
            continue
        dominated = False
        for j, (b_size, b_loss) in enumerate(costs):
            if i == j or math.isnan(b_size) or math.isnan(b_loss):
                continue
            if b_size <= a_size and b_loss <= a_loss and (b_size < a_size or b_loss < a_loss):
                dominated = True
                break
        flags.append(not dominated)
    return flags


def num_cell(value: float | None, digits: int, scale: float = 1.0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value * scale:,.{digits}f}"


def pct_cell(value: float | None) -> str:
    """``0.518`` -> ``"51.8%"``; a missing or NaN share -> "—" (no stray %)."""
    cell = num_cell(value, 1, 100.0)
    return cell + "%" if cell != "—" else cell


def plain_log_labels(axis: Any) -> None:
    """Plain numbers (20, 50, 100), not 10^x, on a log axis: variants often span under a
    decade, where only minor ticks fall, so the 2x and 5x minor ticks are labelled too (and
    no others, so labels do not collide)."""
    from matplotlib.ticker import FuncFormatter

    axis.set_major_formatter(FuncFormatter(lambda x, _pos: f"{x:g}"))
    axis.set_minor_formatter(
        FuncFormatter(lambda x, _pos: f"{x:g}" if f"{x:.0e}"[0] in "25" else "")
    )
