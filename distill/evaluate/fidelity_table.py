"""The fidelity section of report.md and the model card: one table row per variant over every
set (distill/evaluate/fidelity.py), then one line per set saying what it is."""

from __future__ import annotations

from typing import Any

from distill.evaluate.figures import num_cell as _num
from distill.evaluate.figures import pct_cell as _pct
from distill.names import ANSWER_SETS


def fidelity_set_names(report: dict[str, Any]) -> list[str]:
    """The fidelity sets the report's rows carry, in order of first appearance (the answer
    sets, which have other figures, last)."""
    names: list[str] = []
    for v in report["variants"]:
        names += [n for n in v.get("fidelity") or {} if n not in names]
    return [n for n in names if n not in ANSWER_SETS] + [n for n in names if n in ANSWER_SETS]


def format_fidelity_table(report: dict[str, Any]) -> str:
    """Fidelity to the teacher, one line per variant: per scored set perplexity, KL(teacher ||
    variant) and top-1 agreement; for each answer set the teacher's NLL of the variant's greedy
    answers, its ratio to the teacher's NLL of its own, and the answers' repeats. Empty when
    no row has the sets."""
    names = fidelity_set_names(report)
    if not names:
        return ""
    scored = [n for n in names if n not in ANSWER_SETS]
    answered = [n for n in names if n in ANSWER_SETS]
    head = ["variant"]
    for n in scored:
        head += [f"{n} ppl", f"{n} KL", f"{n} top-1"]
    for n in answered:
        head += [f"{n} answers: teacher NLL", "× teacher's own", "repeats"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for v in report["variants"]:
        sets = v.get("fidelity")
        if not sets:
            continue  # a row timed only (teacher-gguf-f16)
        cells = [v["name"]]
        for n in scored:
            f = sets.get(n) or {}
            cells += [
                _num(f.get("perplexity"), 2),
                _num(f.get("kl_to_teacher"), 4),
                _pct(f.get("top1_agreement")),
            ]
        for n in answered:
            g = sets.get(n) or {}
            ratio = g.get("teacher_nll_ratio")
            ratio_cell = _num(ratio, 2)
            repeats = _num(g.get("repeated_4grams"), 0, 100.0)
            cells += [
                _num(g.get("teacher_nll"), 3),
                ratio_cell + ("×" if ratio_cell != "—" else ""),
                repeats + ("%" if repeats != "—" else ""),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fidelity_lines(report: dict[str, Any], heading: str) -> list[str]:
    """The fidelity section (``heading``, table, one line per set saying what it is), or
    nothing when the report has no fidelity sets: report.md's and the model card's."""
    table = format_fidelity_table(report)
    if not table:
        return []
    described = report.get("fidelity") or {}
    notes = [
        f"- {name}: {described[name]['description']}."
        for name in fidelity_set_names(report)
        if (described.get(name) or {}).get("description")
    ]
    return [
        heading,
        "",
        table,
        "",
        *notes,
        "- KL is KL(teacher || variant) in nats per scored token; NLL in nats per answer "
        "token; GGUF rows are scored and answer in llama.cpp.",
    ]


def draft_lines(report: dict[str, Any]) -> list[str]:
    """Each variant as the teacher's draft model (distill/evaluate/draft.py), per answer set:
    the share of the teacher's greedy answer tokens it guesses, and the tokens a teacher pass
    yields in greedy speculative decoding at each draft length; then the student's GGUF file
    drafting for the teacher's in llama.cpp, timed. Empty without either."""
    rows = []
    lengths: list[str] = []
    for v in report["variants"]:
        for name in ANSWER_SETS:
            draft = ((v.get("fidelity") or {}).get(name) or {}).get("draft")
            if not draft:
                continue
            by = draft["by_draft_length"]
            lengths = lengths or list(by)
            cells = [v["name"], name, _pct(draft["top1_on_teacher_answers"])]
            cells += [_num(by[k]["tokens_per_pass"], 2) for k in lengths]
            rows.append("| " + " | ".join(cells) + " |")
    timed = _timed_draft_lines(report.get("draft_speed"))
    if not rows and not timed:
        return []
    out = ["## The student as the teacher's draft model", ""]
    if rows:
        head = ["variant", "answers", "guesses the teacher's token"]
        head += [f"tokens / teacher pass, k={k}" for k in lengths]
        out += [
            "| " + " | ".join(head) + " |",
            "|---|---|" + "---:|" * (len(head) - 2),
            *rows,
            "",
            "- Greedy speculative decoding of the teacher's own greedy answers: the variant "
            "drafts k tokens, the teacher keeps those that equal its own and adds one, so the "
            "output is the teacher's and each teacher pass yields 1 to k + 1 tokens (1 without "
            "a draft). Computed from one teacher-forced pass of the variant in its own runtime.",
        ]
    return out + timed


def _identity(r: dict[str, Any], timed: dict[str, Any]) -> str:
    if r["identical"]:
        return "yes"
    return (
        f"no: {r['identical_answers']} of {timed['answers']} answers; {r['shared_prefix']} of "
        f"{timed['tokens']} tokens before the first difference"
    )


def best_draft(timed: dict[str, Any]) -> dict[str, Any]:
    """The timed draft length with the highest speed-up."""
    return max(timed["by_draft_length"], key=lambda r: r["speedup"])


def _timed_draft_lines(timed: dict[str, Any] | None) -> list[str]:
    if not timed:
        return []
    if timed.get("error"):
        return ["", f"- The student was not timed as a draft model in llama.cpp: {timed['error']}."]
    kind = timed["gguf"].upper()
    out = [
        "",
        f"Timed in llama.cpp: the teacher's F16 file alone, and with the student's {kind} file "
        "drafting.",
        "",
        f"| draft tokens k | teacher alone s | with the {kind} draft s | speed-up | "
        "output the teacher's own |",
        "|---:|---:|---:|---:|---|",
    ]
    for r in timed["by_draft_length"]:
        out.append(
            f"| {r['draft_length']} | {timed['teacher_s']:.1f} | {r['assisted_s']:.1f} | "
            f"{r['speedup']:.2f}× | {_identity(r, timed)} |"
        )
    best = best_draft(timed)
    out += [
        "",
        f"- {timed['answers']} held-out prompts of the generation set, {timed['new_tokens']} "
        f"greedy tokens each, batch 1, {timed['threads']} threads, one run. Best: k = "
        f"{best['draft_length']}, {best['speedup']:.2f}× the teacher's own speed (below 1 is a "
        "slow-down). llama.cpp checks a draft in one batch, whose kernels round differently "
        "from one token's, so a near-tie can turn an answer. transformers' assisted generation: "
        "`scripts/bench/bench_draft.py` (docs/draft.md).",
    ]
    return out


def draft_summary(report: dict[str, Any], variant: str = "student", k: str = "4") -> str | None:
    """One sentence on ``variant`` as the teacher's draft model at draft length ``k`` (the
    model card's line), or None when the report has no draft figures for it."""
    row = next((v for v in report["variants"] if v["name"] == variant), None)
    parts = []
    for name in ANSWER_SETS:
        draft = (((row or {}).get("fidelity") or {}).get(name) or {}).get("draft")
        if draft and k in draft["by_draft_length"]:
            per_pass = draft["by_draft_length"][k]["tokens_per_pass"]
            parts.append(f"{_num(per_pass, 2)} tokens per teacher pass on the {name} answers")
    timed = report.get("draft_speed") or {}
    if not parts:
        return None
    line = (
        f"As the teacher's draft model (greedy speculative decoding, {k} draft tokens a pass; "
        f"the output is the teacher's own): {' and '.join(parts)}, against 1 without a draft."
    )
    if timed.get("by_draft_length"):
        best = best_draft(timed)
        same = "identical to" if best["identical"] else "not always identical to"
        line += (
            f" Timed in llama.cpp, its {timed['gguf'].upper()} file drafting "
            f"{best['draft_length']} tokens ran the teacher's F16 file at {best['speedup']:.2f}× "
            f"its own speed, output {same} the teacher's."
        )
    return line
