"""The evaluate report: ``report.json``, ``report.md`` (tables and notes) and the plot.

Sizes are decimal (kB, MB, GB in steps of 10^3), as disk sizes are quoted; a missing or NaN
figure prints as "—". The JSON keeps every row field; the markdown shows the quality table,
then the memory model against the bandwidth bound.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from distill.evaluate.memory import BANDWIDTH_METHOD
from distill.run_dir import REPORT_PLOT, RunDir

MB = 1_000_000  # decimal megabyte, as disk sizes are quoted


def human_bytes(value: float | None) -> str:
    """``1234567`` -> ``"1.2 MB"`` (decimal units, as disk sizes are quoted); None -> "—"."""
    if value is None:
        return "—"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value:.0f} B"


def human_count(value: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.1f}{unit}"
    return f"{value:.0f}"


def _num(value: float | None, digits: int, scale: float = 1.0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value * scale:,.{digits}f}"


def format_table(report: dict[str, Any]) -> str:
    """The report's variants as a markdown table: sizes in kB/MB/GB (10^3 steps), perplexity
    to 2 decimals, KL in nats per token, top-1 agreement in percent."""
    lines = [
        "| variant | params | weights | on disk | peak memory | perplexity | KL to teacher "
        "| top-1 agreement | prefill tok/s | decode tok/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for v in report["variants"]:
        lines.append(
            f"| {v['name']} | {human_count(v['params'])} | {human_bytes(v['weight_bytes'])} "
            f"| {human_bytes(v['disk_bytes'])} | {human_bytes(v['peak_memory_bytes'])} "
            f"| {_num(v['perplexity'], 2)} | {_num(v['kl_to_teacher'], 4)} "
            f"| {_num(v['top1_agreement'], 1, 100.0)}% | {_num(v['prefill_tokens_per_s'], 0)} "
            f"| {_num(v['decode_tokens_per_s'], 1)} |"
        )
    return "\n".join(lines)


def format_memory_table(report: dict[str, Any]) -> str:
    """Memory model and decode against the bandwidth bound, one line per variant."""
    variants = report["variants"]
    if not variants or "memory_model" not in variants[0]:
        return ""
    mm0 = variants[0]["memory_model"]
    batch = next((v.get("decode_batch_size") for v in variants if v.get("decode_batch_size")), None)
    total = f"weights + KV ({mm0['batch_size']} x {mm0['context_tokens']} tokens)"
    head = (
        f"| variant | weights | KV / token | {total} | fits budget "
        "| decode b=1 tok/s | bound | of bound |"
    )
    rule = "|---|---:|---:|---:|:---:|---:|---:|---:|"
    if batch:
        head += f" decode b={batch} tok/s | bound | of bound |"
        rule += "---:|---:|---:|"
    compiled = any("decode_compiled_method" in v for v in variants)
    if compiled:
        head += " compiled b=1 tok/s | of bound |"
        rule += "---:|---:|"
    lines = [head, rule]
    for v in variants:
        mm = v["memory_model"]
        fits = {None: "-", True: "yes", False: "**no**"}[mm["fits_budget"]]
        line = (
            f"| {v['name']} | {human_bytes(v['weight_bytes'])} "
            f"| {human_bytes(v['kv_cache_bytes_per_token'])} | {human_bytes(mm['total_bytes'])} "
            f"| {fits} | {_num(v['decode_tokens_per_s'], 1)} "
            f"| {_num(v.get('decode_bound_tokens_per_s'), 1)} "
            f"| {_num(v.get('decode_bound_ratio'), 0, 100.0)}% |"
        )
        if batch:
            line += (
                f" {_num(v.get('decode_tokens_per_s_batch'), 1)} "
                f"| {_num(v.get('decode_bound_tokens_per_s_batch'), 1)} "
                f"| {_num(v.get('decode_bound_ratio_batch'), 0, 100.0)}% |"
            )
        if compiled:
            if v.get("decode_compiled_error"):
                line += " failed (see report.json) | - |"
            elif v.get("decode_compiled_tokens_per_s") is None:
                line += " - | - |"
            else:
                line += (
                    f" {_num(v['decode_compiled_tokens_per_s'], 1)} "
                    f"| {_num(v.get('decode_compiled_bound_ratio'), 0, 100.0)}% |"
                )
        lines.append(line)
    return "\n".join(lines)


def _module_label(entry: Any) -> str:
    # quantize.json lists {"name", "class", "reason"}; accept bare names too.
    if isinstance(entry, dict):
        return f"{entry.get('name')} ({entry.get('reason', 'no reason given')})"
    return str(entry)


def render_markdown(report: dict[str, Any]) -> str:
    variants = report["variants"]
    last = variants[-1] if variants else {}
    lines = [
        "# Evaluation report",
        "",
        format_table(report),
        "",
        f"- Quality on the same {last.get('scored_tokens', 0):,} held-out next-token positions "
        "for every variant. KL is KL(teacher || variant) in nats per position; top-1 agreement "
        "is how often the variant's most likely next token is the teacher's.",
        f"- Peak memory ({last.get('peak_memory_method', 'n/a')}): growth from just before "
        "loading the variant to the end of its evaluation. The teacher is loaded before its "
        "window opens, so its figure is its evaluation growth plus its resident weights.",
        f"- Speed at batch size 1 on {last.get('device', 'n/a')}, medians of the repeats after "
        f"a warm-up: prefill is one forward over {last.get('prefill_tokens', 'n/a')} tokens; "
        f"decode is {last.get('decode_tokens', 'n/a')} greedy new tokens after a "
        f"{last.get('prompt_tokens', 'n/a')}-token prompt, timed over the whole generate call.",
    ]
    memory = format_memory_table(report)
    if memory:
        bw = (report.get("machine") or {}).get("bandwidth_bytes_per_s")
        budget = variants[0]["memory_model"]["budget_bytes"]
        lines += [
            "",
            "## Memory and the bandwidth bound",
            "",
            memory,
            "",
            "- Decoding a token reads every weight once plus the KV cache of every earlier "
            "position, so decode tokens/s <= bandwidth / bytes read per token (x batch, at "
            "batch > 1). Bytes read: the weights as loaded for the timed decode (GGUF files "
            "are loaded dequantized to fp32 here) plus K/V for the mean cached context.",
            f"- Memory copy bandwidth measured here: {_num(bw and bw / 1e9, 1)} GB/s "
            f"({(report.get('machine') or {}).get('bandwidth_method', BANDWIDTH_METHOD)})."
            + (f" Budget: {human_bytes(budget)} (eval.memory_budget_bytes)." if budget else ""),
        ]
        method = next(
            (v["decode_compiled_method"] for v in variants if "decode_compiled_method" in v), None
        )
        if method:
            lines.append(
                "- Compiled decode (variants in eval.compiled_decode): the same greedy decode "
                f"timed with {method}; its logits matched the eager model's on the same tokens "
                "before it was timed. It times the decode steps only; the eager columns time "
                "the whole generate call, prefill included. Eager batch-1 decode on CPU runs "
                "each linear as an MKL matrix-vector product on one core, hence its lower "
                "share of the bound."
            )
    for v in variants:
        if v.get("skipped_modules"):
            kept = ", ".join(_module_label(m) for m in v["skipped_modules"])
            lines.append(f"- {v['name']} leaves these modules in float: {kept}")
    lines.append(f"\n![memory vs quality]({REPORT_PLOT})\n")
    return "\n".join(lines)


def plot_memory_vs_quality(report: dict[str, Any], path: Path) -> None:
    """Scatter of weight MB (log x) against perplexity, one labelled point per variant."""
    # The object-oriented API with the Agg canvas: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    fig = Figure(figsize=(7, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for v in report["variants"]:
        x, y = v["weight_bytes"] / MB, v["perplexity"]
        ax.scatter([x], [y], s=40)
        ax.annotate(v["name"], (x, y), textcoords="offset points", xytext=(6, 4), fontsize=9)
    ax.set_xscale("log")
    # Plain numbers (20, 50, 100) instead of 10^x labels: variants often span under a
    # decade, where only minor ticks fall; label the 2x and 5x ones so they do not collide.
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _pos: f"{x:g}"))
    ax.xaxis.set_minor_formatter(
        FuncFormatter(lambda x, _pos: f"{x:g}" if f"{x:.0e}"[0] in "25" else "")
    )
    ax.margins(x=0.15, y=0.12)  # room for the labels of the outermost points
    ax.set_xlabel("weight memory (MB, log scale)")
    ax.set_ylabel("held-out perplexity (lower is better)")
    ax.set_title("Memory vs quality of the distilled variants")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def write_report(report: dict[str, Any], run_dir: Path) -> None:
    """``report.json``, ``report.md`` and ``memory_vs_quality.png`` in ``run_dir``."""
    rd = RunDir(run_dir)
    rd.report_json.write_text(json.dumps(report, indent=2, allow_nan=True) + "\n")
    rd.report_md.write_text(render_markdown(report))
    plot_memory_vs_quality(report, rd.report_plot)
