"""``memory_vs_quality.png``: a report's variants as two panels a person reads at a glance.

Left, perplexity against weight MB (both log scales, the Pareto front dashed); right, deployed
decode speed against perplexity, the marker's shape naming the runtime. One colour per
variant, named in one shared legend, so no label overprints a point.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from distill.evaluate.figures import deployed, pareto_front, plain_log_labels, runtime_family

MB = 1_000_000  # decimal megabyte, as disk sizes are quoted


_RUNTIME_MARKERS = {"llama.cpp": "s", "torch.compile": "o", "eager": "^"}


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _pareto_line(ax: Any, points: list[tuple[float, float]]) -> None:
    """The undominated (bytes, perplexity) points joined in a dashed staircase."""
    front = sorted(p for p, keep in zip(points, pareto_front(points), strict=True) if keep)
    if len(front) > 1:
        xs, ys = zip(*front, strict=True)
        ax.step(xs, ys, where="post", color="0.4", ls="--", lw=1, zorder=1, label="Pareto front")


def _labelled(low: float, high: float) -> bool:
    """Whether a 1x, 2x or 5x power of ten (the ticks that carry labels) lies in [low, high]."""
    for exponent in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1):
        if any(low <= m * 10.0**exponent <= high for m in (1, 2, 5)):
            return True
    return False


def _label_a_short_span(axis: Any) -> None:
    """A log axis whose points span too little for any labelled tick (held-out perplexities
    26.9 and 27.6, say) gets ticks at the extremes of its data, so it can still be read."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    low, high = sorted(axis.get_view_interval())
    if low <= 0 or _labelled(low, high):
        return
    values = sorted({v for line in axis.axes.collections for v in _coords(line, axis)})
    if values:
        # Every point's value, but none within a sixth of the span of one already kept.
        ticks = [values[0]]
        for v in values[1:]:
            if math.log(v / ticks[-1]) >= math.log(values[-1] / values[0]) / 6:
                ticks.append(v)
        if ticks[-1] != values[-1]:
            ticks[-1] = values[-1]
        axis.set_major_locator(FixedLocator(ticks))
        axis.set_major_formatter(FuncFormatter(lambda x, _pos: f"{x:.4g}"))
        axis.set_minor_formatter(NullFormatter())


def _coords(collection: Any, axis: Any) -> list[float]:
    offsets = collection.get_offsets()
    column = 0 if axis is axis.axes.xaxis else 1
    return [float(row[column]) for row in offsets if _finite(float(row[column]))]


def plot_memory_vs_quality(report: dict[str, Any], path: Path) -> None:
    """Two panels: perplexity against weight MB (both log, Pareto front dashed), and deployed
    decode speed against perplexity. One colour per variant, named in one shared legend (no
    labels on the points, so none overprint); the teacher is a star; the marker shape of
    the speed panel is the runtime."""
    # The object-oriented API with the Agg canvas: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [v for v in report["variants"] if _finite(v.get("perplexity"))]
    fig = Figure(figsize=(11, 5.2), dpi=120)
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    colours = [f"C{i % 10}" for i in range(len(rows))]
    for v, c in zip(rows, colours, strict=True):
        teacher = v["name"].startswith("teacher")
        left.scatter(
            [v["weight_bytes"] / MB],
            [v["perplexity"]],
            s=160 if teacher else 50,
            marker="*" if teacher else "o",
            color=c,
            edgecolor="black",
            lw=0.5,
            zorder=3,
            label=v["name"],
        )
        runtime, decode, _ = deployed(v)
        if _finite(decode):
            right.scatter(
                [v["perplexity"]],
                [decode],
                s=160 if teacher else 60,
                color=c,
                marker="*" if teacher else _RUNTIME_MARKERS.get(runtime_family(runtime), "D"),
                edgecolor="black",
                lw=0.5,
                zorder=3,
            )
    shown = sorted(  # the teacher is a star, whatever its runtime: not in the key
        {
            runtime_family(deployed(v)[0])
            for v in rows
            if _finite(deployed(v)[1]) and not v["name"].startswith("teacher")
        },
        key=lambda r: list(_RUNTIME_MARKERS).index(r) if r in _RUNTIME_MARKERS else 99,
    )
    for v in report["variants"]:  # the teacher timed where it has no perplexity (its F16 file)
        runtime, decode, _ = deployed(v)
        if v["name"].startswith("teacher") and _finite(decode) and v not in rows:
            right.axhline(decode, color="0.3", ls=":", lw=1.2, zorder=1)
            right.annotate(
                f"{v['name']}: {decode:.0f} tok/s",
                (0.01, decode),
                xycoords=("axes fraction", "data"),
                va="bottom",
                fontsize=8,
                color="0.3",
            )
    _pareto_line(left, [(v["weight_bytes"] / MB, v["perplexity"]) for v in rows])
    for ax in (left, right):
        ax.grid(True, which="both", alpha=0.3)
    for scale in (left.set_xscale, left.set_yscale, right.set_xscale):
        scale("log")
    for axis in (left.xaxis, left.yaxis, right.xaxis):
        plain_log_labels(axis)
        _label_a_short_span(axis)
    left.set_xlabel("weight memory (MB, log scale)")
    left.set_ylabel("held-out perplexity (log scale, lower is better)")
    left.set_title("Memory vs quality")
    right.set_xlabel("held-out perplexity (log scale, lower is better)")
    right.set_ylabel("decode tokens/s, batch 1, deployed runtime")
    symbols = {"llama.cpp": "■", "torch.compile": "●", "eager": "▲"}
    keys = ", ".join(f"{symbols[r]} {r}" for r in shown if r in symbols)
    right.set_title("Decode speed where deployed" + (f"\n({keys})" if keys else ""))
    handles, labels = left.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06 + 0.035 * math.ceil(len(labels) / 4), 1, 1))
    fig.savefig(path)
