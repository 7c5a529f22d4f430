"""The evaluate report: ``report.json``, ``report.md`` (tables and notes) and the plot.

Sizes are decimal (kB, MB, GB in steps of 10^3), as disk sizes are quoted; a missing or NaN
figure prints as "—". The JSON keeps every row field; the markdown shows the quality table,
the fidelity sets (distill/evaluate/fidelity.py), then the memory model against the
bandwidth bound.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from distill.evaluate.fidelity_table import (  # noqa: F401  (also read from here by tests)
    draft_lines,
    fidelity_lines,
    fidelity_set_names,
    format_fidelity_table,
)
from distill.evaluate.figures import deployed, runtime_family
from distill.evaluate.figures import num_cell as _num
from distill.evaluate.figures import pct_cell as _pct
from distill.evaluate.memory import BANDWIDTH_METHOD
from distill.evaluate.plot import plot_memory_vs_quality
from distill.evaluate.tasks import task_lines
from distill.run_dir import REPORT_PLOT, RunDir, process_tag


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


def teacher_speed(report: dict[str, Any], runtime: str) -> float | None:
    """The teacher's deployed decode rate in ``runtime`` (its llama.cpp F16 row for llama.cpp),
    or None when the teacher was not measured there: a ratio across runtimes would say more
    about the runtimes than about the student."""
    family = runtime_family(runtime)
    for v in report["variants"]:
        if v["name"].startswith("teacher"):
            rt, decode, _ = deployed(v)
            if runtime_family(rt) == family and decode:
                return decode
    return None


def _speed_cell(v: dict[str, Any], decode: float | None) -> str:
    if decode is not None:
        return _num(decode, 1)
    if v.get("llama_cpp_error"):
        return "not run (see notes)"
    return "—"


def format_table(report: dict[str, Any]) -> str:
    """The headline: per variant its quality and its speed in the runtime it deploys to, with
    decode speed as a multiple of the teacher's in that same runtime. Sizes in kB/MB/GB (10^3
    steps), perplexity to 2 decimals, KL in nats per token, top-1 agreement in percent."""
    lines = [
        "| variant | runtime | weights | perplexity | KL to teacher | top-1 agreement "
        "| decode tok/s | × teacher | prefill tok/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for v in report["variants"]:
        runtime, decode, prefill = deployed(v)
        base = teacher_speed(report, runtime)
        ratio = decode / base if decode is not None and base else None
        lines.append(
            f"| {v['name']} | {runtime} | {human_bytes(v['weight_bytes'])} "
            f"| {_num(v['perplexity'], 2)} | {_num(v['kl_to_teacher'], 4)} "
            f"| {_pct(v['top1_agreement'])} | {_speed_cell(v, decode)} "
            f"| {_num(ratio, 2)}{'×' if ratio is not None else ''} | {_num(prefill, 0)} |"
        )
    return "\n".join(lines)


def format_diagnostics_table(report: dict[str, Any]) -> str:
    """Eager PyTorch timings and memory, one line per variant: what the headline replaced."""
    lines = [
        "| variant | params | on disk | peak memory | eager prefill tok/s | eager decode tok/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for v in report["variants"]:
        if runtime_family(deployed(v)[0]) == "llama.cpp":
            continue  # scored and timed in llama.cpp only: no eager figure to show
        lines.append(
            f"| {v['name']} | {human_count(v['params'])} | {human_bytes(v.get('disk_bytes'))} "
            f"| {human_bytes(v.get('peak_memory_bytes'))} "
            f"| {_num(v.get('prefill_tokens_per_s'), 0)} "
            f"| {_num(v.get('decode_tokens_per_s'), 1)} |"
        )
    # One line per reason, naming its rows (every row shares it when eager timing is off).
    untimed: dict[str, list[str]] = {}
    for v in report["variants"]:
        if v.get("eager_timing"):
            untimed.setdefault(v["eager_timing"], []).append(v["name"])
    notes = [f"- {', '.join(names)}: {why}." for why, names in untimed.items()]
    return "\n".join(lines + ([""] + notes if notes else []))


def _deployed_bound(v: dict[str, Any]) -> float | None:
    """The bandwidth bound of the runtime a row deploys to (older reports: the eager one)."""
    return v.get("deployed_bound_tokens_per_s", v.get("decode_bound_tokens_per_s"))


def _bound_ratio(v: dict[str, Any]) -> float | None:
    """Deployed batch-1 decode as a fraction of its bandwidth bound (None if either is missing)."""
    _, decode, _ = deployed(v)
    bound = _deployed_bound(v)
    return decode / bound if decode is not None and bound else None


def format_memory_table(report: dict[str, Any]) -> str:
    """Memory model, and deployed batch-1 decode against the bandwidth bound of the bytes that
    runtime reads per token (a GGUF file's own tensor bytes in llama.cpp), one line a variant."""
    variants = report["variants"]
    if not variants or "memory_model" not in variants[0]:
        return ""
    mm0 = variants[0]["memory_model"]
    total = f"weights + KV ({mm0['batch_size']} x {mm0['context_tokens']} tokens)"
    lines = [
        f"| variant | runtime | weights | KV / token | {total} | fits budget "
        "| bytes read / token | decode b=1 tok/s | bound | of bound |",
        "|---|---|---:|---:|---:|:---:|---:|---:|---:|---:|",
    ]
    for v in variants:
        mm = v["memory_model"]
        fits = {None: "-", True: "yes", False: "**no**"}[mm["fits_budget"]]
        runtime, decode, _ = deployed(v)
        bound = _deployed_bound(v)
        read = v.get("deployed_bytes_per_token", v.get("decode_bytes_per_token"))
        ratio = _bound_ratio(v)
        lines.append(
            f"| {v['name']} | {runtime} | {human_bytes(v['weight_bytes'])} "
            f"| {human_bytes(v['kv_cache_bytes_per_token'])} | {human_bytes(mm['total_bytes'])} "
            f"| {fits} | {human_bytes(read)} | {_speed_cell(v, decode)} | {_num(bound, 1)} "
            f"| {_num(ratio, 0, 100.0)}{'%' if ratio is not None else ''} |"
        )
    return "\n".join(lines)


def format_batch_table(report: dict[str, Any]) -> str:
    """Eager decode at ``eval.decode_batch_size`` against its bound (empty when not measured)."""
    rows = [v for v in report["variants"] if v.get("decode_tokens_per_s_batch") is not None]
    if not rows:
        return ""
    lines = [
        f"| variant | eager decode b={rows[0]['decode_batch_size']} tok/s | bound | of bound |",
        "|---|---:|---:|---:|",
    ]
    for v in rows:
        lines.append(
            f"| {v['name']} | {_num(v['decode_tokens_per_s_batch'], 1)} "
            f"| {_num(v.get('decode_bound_tokens_per_s_batch'), 1)} "
            f"| {_num(v.get('decode_bound_ratio_batch'), 0, 100.0)}% |"
        )
    return "\n".join(lines)


def _module_label(entry: Any) -> str:
    # quantize.json lists {"name", "class", "reason"}; accept bare names too.
    if isinstance(entry, dict):
        return f"{entry.get('name')} ({entry.get('reason', 'no reason given')})"
    return str(entry)


def _speed_note(variants: list[dict[str, Any]], machine: dict[str, Any]) -> str:
    """How the headline's speeds were measured, from what the rows say happened."""
    parts = []
    in_llama = [v for v in variants if runtime_family(deployed(v)[0]) == "llama.cpp"]
    if in_llama:
        llama = machine.get("llama_cpp") or {}
        threads = llama.get("threads") or in_llama[0].get("llama_cpp_threads")
        source = llama.get("threads_source") or in_llama[0].get("llama_cpp_threads_source")
        how = f", {threads} threads" + (f" ({source})" if source else "") if threads else ""
        parts.append(f"GGUF rows in llama.cpp{how}, timed by llama.cpp itself")
    compiled = [v["name"] for v in variants if v.get("decode_compiled_tokens_per_s") is not None]
    if compiled:
        parts.append(f"{', '.join(compiled)} decoded compiled (torch.compile)")
    plain = [
        v["name"]
        for v in variants
        if v not in in_llama and v.get("decode_compiled_tokens_per_s") is None
    ]
    if plain:
        parts.append(
            f"no deployed speed for {', '.join(plain)} (PyTorch, not compiled: their eager "
            "timings are in the diagnostics, and experiment=compiled measures compiled decode)"
        )
    return "; ".join(parts)


def _first(variants: list[dict[str, Any]], key: str) -> Any:
    """``key`` of the first row that has it (a timed-only row has no held-out count)."""
    return next((v[key] for v in variants if v.get(key)), None)


def _teacher_references(variants: list[dict[str, Any]]) -> str:
    """Where the teacher's own speed was measured, the rows' "× teacher" divides by."""
    by_name = {v["name"]: v for v in variants}
    where = []
    if (by_name.get("teacher-gguf-f16") or {}).get("deployed_decode_tokens_per_s"):
        where.append("its F16 GGUF in llama.cpp")
    if (by_name.get("teacher") or {}).get("decode_compiled_tokens_per_s"):
        where.append("the compiled teacher in torch.compile")
    if not where:
        return "× teacher is empty: the teacher's speed was not measured in a deployed runtime."
    return (
        f"× teacher divides by the teacher's rate in the same runtime ({', '.join(where)}), "
        "and is left empty where the teacher was not measured there."
    )


def _llama_made_notes(variants: list[dict[str, Any]]) -> list[str]:
    """What each GGUF file llama.cpp's quantizer made holds: a k-quant mix falls back per
    tensor where a row is not whole 256-value blocks, so its name alone can mislead."""
    out = []
    for v in variants:
        if not v.get("made_by"):
            continue
        types = sorted((v.get("tensor_types") or {}).items(), key=lambda kv: -kv[1])
        held = ", ".join(f"{n} {t.upper()}" for t, n in types)
        imatrix = "with" if v.get("imatrix") else "without"
        out.append(
            f"- {v['name']}: made by {v['made_by']}, {imatrix} an importance matrix; its "
            f"tensors: {held}."
        )
    return out


def _notes(report: dict[str, Any]) -> list[str]:
    variants = report["variants"]
    scored = _first(variants, "scored_tokens") or 0
    in_llama = any(v.get("quality_scored") for v in variants)
    notes = [
        f"- Quality on the same {scored:,} held-out next-token positions "
        "for every variant. KL is KL(teacher || variant) in nats per position; top-1 agreement "
        "is how often the variant's most likely next token is the teacher's."
        + (" GGUF rows are scored from llama.cpp's own logits." if in_llama else ""),
        f"- Speed at batch size 1, in the runtime each variant deploys to: "
        f"{_speed_note(variants, report.get('machine') or {})}. Decode: "
        f"{_first(variants, 'decode_tokens') or 'n/a'} greedy tokens after a "
        f"{_first(variants, 'prompt_tokens') or 'n/a'}-token prompt, median of the repeats; "
        f"{_teacher_references(variants)}",
    ]
    for v in variants:
        if v.get("llama_cpp_error"):
            notes.append(f"- {v['name']}: not run in llama.cpp: {v['llama_cpp_error']}")
        if v.get("decode_compiled_error"):
            notes.append(f"- {v['name']}: compiled decode failed: {v['decode_compiled_error']}")
    methods = sorted(
        {v["decode_compiled_method"] for v in variants if v.get("decode_compiled_method")}
    )
    for method in methods:
        notes.append(
            f"- Compiled decode: {method}; its logits matched the eager model's on the same "
            "tokens before it was timed, and it times the decode steps only."
        )
    notes += _timed_only_notes(variants)
    notes += _llama_made_notes(variants)
    llama = (report.get("machine") or {}).get("llama_cpp") or {}
    if llama.get("teacher_gguf_error"):
        notes.append(f"- teacher-gguf-f16 not measured: {llama['teacher_gguf_error']}.")
    return notes


def _timed_only_notes(variants: list[dict[str, Any]]) -> list[str]:
    """What a row timed only (no held-out pass) stands on: its parity check, as it went."""
    out = []
    for v in variants:
        if v.get("quality_scored") is not False:
            continue
        parity = v.get("parity") or {}
        if "kl_to_float" in parity:
            verdict = "within" if parity.get("passed") else "**outside**"
            out.append(
                f"- {v['name']}: timed only, as the llama.cpp reference of the GGUF rows; when "
                f"it was exported its llama.cpp logits were compared with the fp32 teacher's "
                f"on {parity.get('scored_positions', 0):,} held-out positions: KL "
                f"{parity['kl_to_float']:.2g} nats, top-1 "
                f"{100 * parity['top1_to_in_memory']:.1f}%, "
                f"max |Δlogit| {parity['max_abs_logit_diff']:.2g} ({verdict} the F16 limits)."
            )
        else:
            out.append(f"- {v['name']}: timed only, as the llama.cpp reference of the GGUF rows.")
    return out


def _memory_section(report: dict[str, Any]) -> list[str]:
    memory = format_memory_table(report)
    if not memory:
        return []
    variants = report["variants"]
    machine = report.get("machine") or {}
    bw = machine.get("bandwidth_bytes_per_s")
    budget = variants[0]["memory_model"]["budget_bytes"]
    return [
        "",
        "## Memory and the bandwidth bound",
        "",
        memory,
        "",
        "- Decoding a token reads every weight once plus the KV cache of every earlier "
        "position, so decode tokens/s <= bandwidth / bytes read per token. Bytes read: the "
        "weights as the deployed runtime holds them (a GGUF file's tensor bytes in llama.cpp, "
        "the loaded tensors in PyTorch) plus K/V for the mean cached context.",
        f"- Memory copy bandwidth measured here: {_num(bw and bw / 1e9, 1)} GB/s "
        f"({machine.get('bandwidth_method', BANDWIDTH_METHOD)})."
        + (f" Budget: {human_bytes(budget)} (eval.memory_budget_bytes)." if budget else ""),
    ] + _above_bound_note(variants)


def _above_bound_note(variants: list[dict[str, Any]]) -> list[str]:
    # Seen on an AMD EPYC host: the compiled fp32 student decoded at 114% of its bound. The
    # bound is a copy's bandwidth, and a read-only stream (what decode is) can run faster
    # than read + write, and part of the weights may stay in a large last-level cache.
    above = [v["name"] for v in variants if (_bound_ratio(v) or 0.0) > 1.0]
    if not above:
        return []
    return [
        f"- Above 100% of the bound: {', '.join(above)}. The bound counts copy bandwidth "
        "(read + write), and decode only reads: this machine streams reads faster than it "
        "copies, or part of the weights stayed in cache. Compare rows with each other."
    ]


def render_markdown(report: dict[str, Any]) -> str:
    """``report.md``: the headline table and its notes, fidelity to the teacher on the other
    sets, memory against the bound, then the eager-PyTorch diagnostics the headline does not
    use."""
    variants = report["variants"]
    last = variants[-1] if variants else {}
    lines = ["# Evaluation report", "", format_table(report), "", *_notes(report)]
    lines += student_lines(report.get("student"))
    fidelity = fidelity_lines(report, "## Fidelity to the teacher")
    lines += ["", *fidelity] if fidelity else []
    draft = draft_lines(report)
    lines += ["", *draft] if draft else []
    tasks = task_lines(report)
    lines += ["", *tasks] if tasks else []
    lines += _memory_section(report)
    lines += [
        "",
        "## Diagnostics: eager PyTorch",
        "",
        format_diagnostics_table(report),
        "",
        f"- Eager timings on {_torch_device(variants)} (GGUF rows run in llama.cpp only, so "
        f"they are not here): prefill is one forward over {last.get('prefill_tokens', 'n/a')} "
        "tokens, decode the whole generate call, prefill included, each timed with nothing "
        "else running. On CPU eager batch-1 decode runs each linear as a one-core "
        "matrix-vector product: not a deployment figure.",
        f"- Peak memory: {_memory_methods(variants)}; the teacher's adds its resident weights. "
        "No timed run happens inside a peak-memory window.",
    ]
    batch = format_batch_table(report)
    if batch:
        lines += ["", batch]
    for v in variants:
        if v.get("skipped_modules"):
            kept = ", ".join(_module_label(m) for m in v["skipped_modules"])
            lines.append(f"- {v['name']} leaves these modules in float: {kept}")
    lines.append(f"\n![memory vs quality]({REPORT_PLOT})\n")
    return "\n".join(lines)


def student_lines(shape: dict[str, Any] | None) -> list[str]:
    """The student's shape against the teacher's, and why it was chosen when a budget chose
    it: a note under the headline."""
    if not shape:
        return []
    depth, of = shape["num_layers"]
    kept = shape.get("teacher_layers")
    parts = [f"{depth} of the teacher's {of} layers" + (f" ({kept})" if kept else "")]
    names = {
        "intermediate_size": "MLP",
        "num_key_value_heads": "kv groups",
        "hidden_size": "hidden",
    }
    for key, label in names.items():
        own, teacher = shape.get(key) or [None, None]
        if own is not None and own != teacher:
            parts.append(f"{label} {own:,} of {teacher:,}")
    line = "- Student: " + ", ".join(parts) + "."
    search = shape.get("shape_search")
    if search:
        line += _search_text(search)
    return [line]


def _search_text(search: dict[str, Any]) -> str:
    """Why the budget search chose this shape, in one sentence (after the shape)."""
    chosen, other = search["chosen"], search.get("runner_up")
    trained = chosen.get("kl_trained")
    budget, count = search["budget"], search["candidates"]
    if trained:
        steps = max(trained, key=int)
        text = (
            f" Chosen for pair.student.budget={budget}: of {count} shapes that fit, the "
            f"{search['finalists']} with the lowest KL to the teacher before training "
            f"were each trained {steps} steps, and this one had the lowest KL after "
            f"({trained[steps]:.3f}; {chosen['kl']:.3f} before; "
            f"{chosen['params'] / 1e6:.1f}M parameters)"
        )
    else:
        text = (
            f" Chosen for pair.student.budget={budget} as the lowest KL to the teacher "
            f"before training ({chosen['kl']:.3f}, {chosen['params'] / 1e6:.1f}M parameters) of "
            f"{count} shapes that fit"
        )
    if other:
        s = other["shape"]
        text += (
            f"; the runner-up, {s['num_layers']} layers with MLP {s['intermediate_size']}, "
            f"{s['num_key_value_heads']} kv groups, hidden {s['hidden_size']}, had "
        )
        after = other.get("kl_trained")
        if trained and after:
            text += f"{after[max(after, key=int)]:.3f} after ({other['kl']:.3f} before)"
        else:
            text += f"{other['kl']:.3f}"
    return text + "."


def _torch_device(variants: list[dict[str, Any]]) -> str:
    return next((v["device"] for v in variants if not v.get("llama_cpp_threads")), "n/a")


def _memory_methods(variants: list[dict[str, Any]]) -> str:
    """Each way a peak was measured, once, with the rows it applies to."""
    by_method: dict[str, list[str]] = {}
    for v in variants:
        if v.get("peak_memory_method"):
            by_method.setdefault(v["peak_memory_method"], []).append(v["name"])
    return "; ".join(f"{m} ({', '.join(names)})" for m, names in by_method.items()) or "n/a"


def write_report(report: dict[str, Any], run_dir: Path) -> None:
    """``memory_vs_quality.png``, ``report.md``, then ``report.json`` in ``run_dir``, each
    renamed into place whole; ``report.json`` last, as it holds the stage's stamp: a stage
    killed midway never leaves a stamped report beside older files."""
    rd = RunDir(run_dir)
    tag = process_tag()
    plot_tmp = rd.report_plot.with_name(f".{rd.report_plot.stem}.tmp-{tag}.png")
    plot_memory_vs_quality(report, plot_tmp)
    os.replace(plot_tmp, rd.report_plot)
    md_tmp = rd.report_md.with_name(f".{rd.report_md.name}.tmp-{tag}")
    md_tmp.write_text(render_markdown(report))
    os.replace(md_tmp, rd.report_md)
    json_tmp = rd.report_json.with_name(f".{rd.report_json.name}.tmp-{tag}")
    json_tmp.write_text(json.dumps(report, indent=2, allow_nan=True) + "\n")
    os.replace(json_tmp, rd.report_json)
