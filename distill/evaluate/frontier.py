"""Aggregate many runs' ``report.json`` into one memory-versus-quality table and plot.

Each variant of each run is a point (weight bytes, perplexity, KL to teacher). A point is on
the Pareto front when no other point is at least as small *and* at least as good, and
strictly better in one of the two. The teacher is kept once per distinct teacher and marked;
``student_init`` rows (students before distillation) are not deployable and are left out.
Runs without a report are listed with the error they left (``FAILED`` file, written by the
entry points), never dropped silently.

Each point also carries its row's fidelity sets (:mod:`distill.evaluate.fidelity`), flattened
to metrics such as ``teacher_text_kl``, ``extra:<name>_ppl`` or ``generation_nll_ratio``; the
frontier is ranked, and a third plot panel drawn, by any metric (``scripts/report.py
--metric teacher_text_kl``), with its own Pareto front against weight bytes.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from distill.errors import DistillError
from distill.evaluate.figures import deployed, pareto_front, plain_log_labels
from distill.evaluate.tasks import task_metrics
from distill.names import ANSWER_SETS
from distill.run_dir import REPORT_JSON, RunDir

FAILED_FILE = "FAILED"


class ReportError(DistillError):
    """Nothing to aggregate where the user pointed."""


@dataclass
class Point:
    run: str
    variant: str
    pair: str
    loss: str
    kd_ratio: float | None
    teacher_mode: str
    weight_bytes: int
    perplexity: float
    kl_to_teacher: float | None
    top1_agreement: float | None
    # Batch-1 decode where the variant deploys (llama.cpp for GGUF rows, torch.compile for a
    # compiled torch row), None where that was not measured (eager timings are not used).
    decode_tokens_per_s: float | None
    bits_per_weight: float | None
    is_teacher: bool
    # From the report's memory model and bandwidth bound (None in reports written before them).
    memory_total_bytes: int | None = None
    fits_budget: bool | None = None
    decode_bound_ratio: float | None = None
    # Compiled batch-1 decode (eval.compiled_decode), where the run measured it.
    decode_compiled_tokens_per_s: float | None = None
    decode_compiled_bound_ratio: float | None = None
    pareto_ppl: bool = False
    pareto_kl: bool = False
    # The fidelity sets' figures (report rows' ``fidelity``), flattened by fidelity_metrics:
    # "<set>_ppl", "<set>_kl", "<set>_top1"; "<answer set>_nll", "_nll_ratio", "_repeats".
    fidelity: dict[str, float | None] = field(default_factory=dict)
    # On the Pareto front of weight bytes against Frontier.metric.
    pareto_metric: bool = False


@dataclass
class FailedRun:
    run: str
    error: str


@dataclass
class Frontier:
    points: list[Point]
    failed: list[FailedRun]
    # What the points are ranked by: a Point field or a fidelity figure (see metric_value).
    metric: str = "perplexity"


def find_run_dirs(paths: list[Path]) -> list[Path]:
    """Run dirs under ``paths``: folders holding report.json, FAILED or a Hydra config.

    A multirun folder is searched recursively; a run dir given directly is taken as is.
    """
    found: list[Path] = []
    for root in paths:
        if not root.exists():
            raise ReportError(f"{root} does not exist: pass run dirs or a multirun dir")
        candidates = [root, *sorted(p for p in root.rglob("*") if p.is_dir())]
        for d in candidates:
            if any(part.startswith(".") for part in d.relative_to(root).parts):
                continue  # Hydra's .hydra/ holds a config.yaml too; it is not a run
            if any(d.is_relative_to(run) for run in found):
                continue  # checkpoints/, publish/ ... inside a run already found
            if any((d / name).exists() for name in (REPORT_JSON, FAILED_FILE, "config.yaml")):
                found.append(d)
    return found


def _training(config: dict[str, Any]) -> tuple[str, str, float | None, str]:
    pair = config.get("pair", {}).get("name", "?")
    # A sweep over the student's layers keeps the pair's name: say how deep each one is.
    student = config.get("pair", {}).get("student", {})
    depth = len(student["layers"]) if student.get("layers") else student.get("num_layers")
    if student.get("init", "from_teacher") == "from_teacher" and depth:
        pair = f"{pair} ({depth} layers)"
    loss_cfg, train, data = (config.get(k, {}) for k in ("loss", "train", "data"))
    # The recipe beside the divergence: what a sweep over methods varies.
    parts = [loss_cfg.get("name", "?")]
    if data.get("teacher_generated_fraction"):
        parts.append(f"teacher text {100 * data['teacher_generated_fraction']:.0f}%")
    if train.get("on_policy_fraction"):
        parts.append(f"on-policy λ={train['on_policy_fraction']:g}")
    if loss_cfg.get("hidden_weight"):
        parts.append(
            f"hidden {loss_cfg.get('hidden_loss', 'cosine')} ×{loss_cfg['hidden_weight']:g}"
        )
    if train.get("max_steps"):
        parts.append(f"{train['max_steps']} steps")
    mode = train.get("teacher_mode", "online")
    return pair, " · ".join(parts), loss_cfg.get("kd_ratio"), mode


# The scored sets' figures, by the suffix their metric name takes.
_SET_FIGURES = {"ppl": "perplexity", "kl": "kl_to_teacher", "top1": "top1_agreement"}
# Point fields a frontier can be ranked by, besides the fidelity figures.
POINT_METRICS = ("perplexity", "kl_to_teacher", "top1_agreement", "decode_tokens_per_s")


def fidelity_metrics(sets: dict[str, Any]) -> dict[str, float | None]:
    """A report row's ``fidelity`` dict as flat metrics: ``<set>_ppl``, ``<set>_kl`` and
    ``<set>_top1`` per scored set; ``<set>_nll``, ``<set>_nll_ratio`` and ``<set>_repeats`` per
    answer set (``generation``, ``general``)."""
    out: dict[str, float | None] = {}
    for name, figures in sets.items():
        if name in ANSWER_SETS:
            out[f"{name}_nll"] = figures.get("teacher_nll")
            out[f"{name}_nll_ratio"] = figures.get("teacher_nll_ratio")
            if "repeated_4grams" in figures:  # reports written before it had none
                out[f"{name}_repeats"] = figures["repeated_4grams"]
            continue
        for suffix, key in _SET_FIGURES.items():
            out[f"{name}_{suffix}"] = figures.get(key)
    return out


def higher_is_better(metric: str) -> bool:
    """Agreement, speed and task scores grow with quality; perplexity, KL and NLL shrink."""
    if metric.startswith("lm_eval:"):
        return not ("perplexity" in metric or "bits_per_byte" in metric)
    return metric.endswith("top1") or metric == "top1_agreement" or "tokens_per_s" in metric


def metric_value(p: Point, metric: str) -> float | None:
    """``p``'s value of ``metric`` (a Point field or a fidelity figure), None when absent or
    NaN."""
    value = getattr(p, metric) if metric in POINT_METRICS else p.fidelity.get(metric)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return float(value)


def available_metrics(points: list[Point]) -> list[str]:
    """The metrics at least one point has, Point fields first."""
    fidelity = sorted({m for p in points for m, v in p.fidelity.items() if v is not None})
    return [*POINT_METRICS, *fidelity]


def load_points(
    run_dirs: list[Path], base: Path | None = None, metric: str = "perplexity"
) -> Frontier:
    """Read every run's report (or failure) into points and failed runs, ranked by ``metric``.

    Raises:
        ReportError: no point has ``metric`` (the message lists the metrics there are).
    """
    points: list[Point] = []
    failed: list[FailedRun] = []
    teachers_seen: set[str] = set()
    for d in run_dirs:
        name = str(d.relative_to(base)) if base and d.is_relative_to(base) else str(d)
        report_file = RunDir(d).report_json
        if not report_file.exists():
            error = (d / FAILED_FILE).read_text().strip() if (d / FAILED_FILE).exists() else ""
            failed.append(FailedRun(name, error or "no report.json (interrupted or still running)"))
            continue
        try:
            report = json.loads(report_file.read_text())
            config = report.get("config", {})
            pair, loss, kd_ratio, mode = _training(config)
            teacher_id = json.dumps(config.get("pair", {}).get("teacher", {}), sort_keys=True)
            for v in report["variants"]:
                if v["name"] == "student_init" or v.get("weight_bytes") is None:
                    continue  # not deployable, or a file nothing could be read from
                is_teacher = v["name"] == "teacher"
                if is_teacher:
                    if teacher_id in teachers_seen:
                        continue
                    teachers_seen.add(teacher_id)
                points.append(
                    Point(
                        run=name,
                        variant=v["name"],
                        pair=pair,
                        loss=loss,
                        kd_ratio=kd_ratio,
                        teacher_mode=mode,
                        weight_bytes=int(v["weight_bytes"]),
                        perplexity=float(v["perplexity"]),
                        kl_to_teacher=v.get("kl_to_teacher"),
                        top1_agreement=v.get("top1_agreement"),
                        decode_tokens_per_s=deployed(v)[1],
                        bits_per_weight=v.get("bits_per_weight"),
                        is_teacher=is_teacher,
                        memory_total_bytes=(v.get("memory_model") or {}).get("total_bytes"),
                        fits_budget=(v.get("memory_model") or {}).get("fits_budget"),
                        decode_bound_ratio=v.get(
                            "deployed_decode_bound_ratio", v.get("decode_bound_ratio")
                        ),
                        decode_compiled_tokens_per_s=v.get("decode_compiled_tokens_per_s"),
                        decode_compiled_bound_ratio=v.get("decode_compiled_bound_ratio"),
                        fidelity={
                            **fidelity_metrics(v.get("fidelity") or {}),
                            **task_metrics(v.get("lm_eval") or {}),
                        },
                    )
                )
        except (KeyError, TypeError, ValueError) as err:
            failed.append(FailedRun(name, f"unreadable report.json: {type(err).__name__}: {err}"))
    if points and all(metric_value(p, metric) is None for p in points):
        raise ReportError(
            f"--metric {metric}: no run reports it; choose one of "
            f"{', '.join(available_metrics(points))}"
        )
    mark_pareto(points, metric)
    return Frontier(points=points, failed=failed, metric=metric)


def metric_costs(points: list[Point], metric: str) -> list[tuple[float, float]]:
    """(weight bytes, cost) per point for :func:`pareto_front`: the metric, negated where
    higher is better, NaN where a point lacks it."""
    sign = -1.0 if higher_is_better(metric) else 1.0
    costs = []
    for p in points:
        value = metric_value(p, metric)
        costs.append((p.weight_bytes, math.nan if value is None else sign * value))
    return costs


def mark_pareto(points: list[Point], metric: str = "perplexity") -> None:
    by_ppl = pareto_front(metric_costs(points, "perplexity"))
    by_kl = pareto_front(metric_costs(points, "kl_to_teacher"))
    by_metric = pareto_front(metric_costs(points, metric))
    for p, a, b, c in zip(points, by_ppl, by_kl, by_metric, strict=True):
        p.pareto_ppl, p.pareto_kl, p.pareto_metric = a, b, c


def ranked(f: Frontier) -> list[Point]:
    """The points best first by ``f.metric``; points without it last."""
    sign = -1.0 if higher_is_better(f.metric) else 1.0
    have = [p for p in f.points if metric_value(p, f.metric) is not None]
    rest = [p for p in f.points if metric_value(p, f.metric) is None]
    return sorted(have, key=lambda p: (sign * metric_value(p, f.metric), p.weight_bytes)) + rest


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f}"


def render_markdown(f: Frontier) -> str:
    lines = [
        "# Memory vs quality frontier",
        "",
        "| run | variant | pair | recipe (kd_ratio) | teacher | weight MB | bits/weight | ppl | "
        "KL to teacher | top-1 | deployed decode tok/s | of bound | compiled tok/s | of bound | "
        "fits budget | Pareto (ppl / KL) |",
        "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: | :---: | --- |",
    ]

    def fmt(x: Any, spec: str) -> str:
        return "–" if x is None else format(x, spec)

    def pct(x: float | None) -> str:
        return "–" if x is None else f"{100 * x:.0f}%"

    for p in sorted(f.points, key=lambda p: (p.weight_bytes, p.perplexity)):
        lines.append(
            f"| {p.run} | {'**teacher**' if p.is_teacher else p.variant} | {p.pair} | "
            f"{p.loss} ({fmt(p.kd_ratio, 'g')}) | {p.teacher_mode} | {_mb(p.weight_bytes)} | "
            f"{fmt(p.bits_per_weight, '.2f')} | {p.perplexity:.2f} | "
            f"{fmt(p.kl_to_teacher, '.4f')} | {fmt(p.top1_agreement, '.3f')} | "
            f"{fmt(p.decode_tokens_per_s, '.1f')} | {pct(p.decode_bound_ratio)} | "
            f"{fmt(p.decode_compiled_tokens_per_s, '.1f')} | "
            f"{pct(p.decode_compiled_bound_ratio)} | "
            f"{ {None: '–', True: 'yes', False: 'no'}[p.fits_budget] } | "
            f"{'yes' if p.pareto_ppl else 'no'} / {'yes' if p.pareto_kl else 'no'} |"
        )
    lines += _fidelity_table(f)
    lines += _ranking(f)
    front = [p for p in f.points if p.pareto_ppl]
    lines += ["", "## Pareto front (weight bytes vs perplexity)", ""]
    lines += [
        f"- {p.run} · {p.variant}: {_mb(p.weight_bytes)} MB, ppl {p.perplexity:.2f}"
        for p in sorted(front, key=lambda p: p.weight_bytes)
    ]
    lines += ["", "## Failed runs", ""]
    lines += [f"- {r.run}: {r.error}" for r in f.failed] or ["none"]
    return "\n".join(lines) + "\n"


def _fmt_metric(metric: str, value: float | None) -> str:
    if value is None:
        return "–"
    if metric.endswith("_ppl") or metric == "perplexity":
        return f"{value:.2f}"
    return f"{value:.3f}" if metric.endswith("top1") or "nll" in metric else f"{value:.4f}"


def _fidelity_table(f: Frontier) -> list[str]:
    """Every point's fidelity figures (``<set>_ppl``, ``_kl``, ``_top1``, generation NLL and
    its ratio to the teacher's own), one column each; nothing when no run has them."""
    metrics = [m for m in available_metrics(f.points) if m not in POINT_METRICS]
    if not metrics:
        return []
    tasks = any(m.startswith("lm_eval:") for m in metrics)
    lines = [
        "",
        "## Fidelity to the teacher" + (" and task scores" if tasks else ""),
        "",
        "| run | variant | " + " | ".join(metrics) + " |",
        "| --- | --- |" + " ---: |" * len(metrics),
    ]
    for p in sorted(f.points, key=lambda p: (p.weight_bytes, p.perplexity)):
        cells = [_fmt_metric(m, metric_value(p, m)) for m in metrics]
        name = "**teacher**" if p.is_teacher else p.variant
        lines.append(f"| {p.run} | {name} | " + " | ".join(cells) + " |")
    return lines


def _ranking(f: Frontier) -> list[str]:
    """The points ranked by ``f.metric``, best first, with their Pareto membership (weight
    bytes against that metric)."""
    better = "higher" if higher_is_better(f.metric) else "lower"
    lines = ["", f"## Ranked by {f.metric} ({better} is better)", ""]
    for i, p in enumerate(ranked(f), 1):
        value = _fmt_metric(f.metric, metric_value(p, f.metric))
        front = ", Pareto front" if p.pareto_metric else ""
        lines.append(
            f"{i}. {p.run} · {p.variant}: {f.metric} {value}, {_mb(p.weight_bytes)} MB{front}"
        )
    return lines


def write_csv(f: Frontier, path: Path) -> None:
    """One row per point (its fidelity figures as ``fidelity.<metric>`` columns), then one
    per failed run."""
    metrics = [m for m in available_metrics(f.points) if m not in POINT_METRICS]
    rows = []
    for p in f.points:
        row = asdict(p)
        sets = row.pop("fidelity")
        rows.append({**row, **{f"fidelity.{m}": sets.get(m) for m in metrics}})
    fields = list(rows[0]) if rows else ["run"]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[*fields, "status", "error"])
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, "status": "ok", "error": ""})
        for failed in f.failed:
            writer.writerow({"run": failed.run, "status": "failed", "error": failed.error})


def plot(f: Frontier, path: Path, memory_budget_bytes: int | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("perplexity", "pareto_ppl", "held-out perplexity"),
        ("kl_to_teacher", "pareto_kl", "mean KL(teacher ‖ model), nats/token"),
    ]
    if f.metric not in ("perplexity", "kl_to_teacher"):  # a third panel for the ranked metric
        panels.append((f.metric, "pareto_metric", f.metric))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5.2))
    kinds = sorted({_kind(p) for p in f.points if not p.is_teacher})
    markers = dict(zip(kinds, "osD^v<>phX*", strict=False))
    for ax, (metric, flag, label) in zip(axes, panels, strict=True):
        pts = [p for p in f.points if metric_value(p, metric) is not None]
        for kind in kinds:
            sel = [p for p in pts if not p.is_teacher and _kind(p) == kind]
            ax.scatter(
                [p.weight_bytes / 1e6 for p in sel],
                [metric_value(p, metric) for p in sel],
                marker=markers[kind],
                s=40,
                label=kind,
                alpha=0.8,
            )
        teachers = [p for p in pts if p.is_teacher]
        if teachers:
            ax.scatter(
                [p.weight_bytes / 1e6 for p in teachers],
                [metric_value(p, metric) for p in teachers],
                marker="*",
                s=220,
                color="black",
                label="teacher",
                zorder=5,
            )
        front = sorted((p for p in pts if getattr(p, flag)), key=lambda p: p.weight_bytes)
        if front:
            ax.step(
                [p.weight_bytes / 1e6 for p in front],
                [metric_value(p, metric) for p in front],
                where="post",
                color="red",
                linewidth=1.2,
                label="Pareto front",
            )
        for p in front:  # name the runs on the front: the points a reader compares
            if not p.is_teacher:
                ax.annotate(
                    p.run,
                    (p.weight_bytes / 1e6, metric_value(p, metric)),
                    xytext=(5, 4),
                    textcoords="offset points",
                    fontsize=7,
                )
        if memory_budget_bytes:
            ax.axvline(
                memory_budget_bytes / 1e6, color="gray", linestyle="--", label="memory budget"
            )
        ax.set_xscale("log")
        plain_log_labels(ax.xaxis)
        if metric == "perplexity":
            ax.set_yscale("log")
            plain_log_labels(ax.yaxis)
        ax.set_xlabel("weight bytes as stored (MB, log scale)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_title("Memory vs perplexity")
    axes[1].set_title("Memory vs fidelity to the teacher")
    if len(panels) > 2:
        axes[2].set_title(f"Memory vs {f.metric}")
    axes[1].legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _kind(p: Point) -> str:
    """Legend group: the precision of the variant (fp32 student, int8, gguf-q4_0, ...)."""
    if p.variant == "student":
        return "student fp32"
    return p.variant.removeprefix("student-")


def write_all(f: Frontier, out_dir: Path, memory_budget_bytes: int | None = None) -> list[Path]:
    """Write frontier.md, .csv, .json and .png into ``out_dir``; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md, csv_path, js, png = (out_dir / f"frontier.{ext}" for ext in ("md", "csv", "json", "png"))
    md.write_text(render_markdown(f))
    write_csv(f, csv_path)
    js.write_text(
        json.dumps(
            {"points": [asdict(p) for p in f.points], "failed": [asdict(r) for r in f.failed]},
            indent=2,
        )
    )
    plot(f, png, memory_budget_bytes)
    return [md, csv_path, js, png]
