"""Aggregation of synthetic report.json files: Pareto membership, failed runs, outputs."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from distill.evaluate.frontier import find_run_dirs, load_points, pareto_front
from tests.conftest import REPO


def variant(name: str, mb: float, ppl: float, kl: float) -> dict:
    return {
        "name": name,
        "params": 1,
        "weight_bytes": int(mb * 1e6),
        "disk_bytes": None,
        "peak_memory_bytes": 0,
        "perplexity": ppl,
        "kl_to_teacher": kl,
        "top1_agreement": 0.5,
        "prefill_tokens_per_s": 1.0,
        "decode_tokens_per_s": 1.0,
    }


def write_run(d: Path, variants: list[dict], kd_ratio: float = 0.5) -> None:
    d.mkdir(parents=True)
    config = {
        "pair": {"name": "t_to_s", "teacher": {"name_or_path": "t"}},
        "loss": {"name": "forward_kl", "kd_ratio": kd_ratio},
        "train": {"teacher_mode": "online"},
    }
    (d / "report.json").write_text(json.dumps({"variants": variants, "config": config}))


def test_pareto_front_by_hand() -> None:
    # (size, loss): b dominates d; a, b, c trade off; e ties a's size with worse loss.
    costs = [(1, 9), (2, 5), (4, 2), (3, 6), (1, 10)]
    assert pareto_front(costs) == [True, True, True, False, False]
    assert pareto_front([(1, float("nan")), (2, 1)]) == [False, True]
    assert pareto_front([(1, 1), (1, 1)]) == [True, True]  # exact ties dominate neither


def test_aggregation_lists_front_teacher_and_failures(tmp_path: Path) -> None:
    sweep = tmp_path / "multirun"
    write_run(
        sweep / "0",
        [
            variant("teacher", 500, 10.0, 0.0),
            variant("student_init", 300, 900.0, 3.0),
            variant("student", 300, 20.0, 0.5),
            variant("student-int8_weight_only", 80, 20.5, 0.52),
        ],
    )
    write_run(
        sweep / "1",
        [
            variant("teacher", 500, 10.0, 0.0),
            variant("student", 300, 25.0, 0.4),
            variant("student-int8_weight_only", 80, 26.0, 0.45),
        ],
        kd_ratio=0.0,
    )
    (sweep / "2").mkdir()
    (sweep / "2" / "FAILED").write_text("DataError: corpus is empty\n")
    (sweep / "2" / "config.yaml").write_text("x: 1\n")
    (sweep / "0" / ".hydra").mkdir()
    (sweep / "0" / ".hydra" / "config.yaml").write_text("x: 1\n")

    runs = find_run_dirs([sweep])
    assert [r.name for r in runs] == ["0", "1", "2"]
    f = load_points(runs, sweep)
    names = [(p.run, p.variant) for p in f.points]
    assert names.count(("0", "teacher")) == 1 and ("1", "teacher") not in names  # once
    assert not any(p.variant == "student_init" for p in f.points)
    front = {(p.run, p.variant) for p in f.points if p.pareto_ppl}
    assert front == {("0", "teacher"), ("0", "student"), ("0", "student-int8_weight_only")}
    front_kl = {(p.run, p.variant) for p in f.points if p.pareto_kl}
    assert ("1", "student") in front_kl and ("1", "student-int8_weight_only") in front_kl
    assert [(r.run, r.error) for r in f.failed] == [("2", "DataError: corpus is empty")]


def test_report_script_writes_four_files(tmp_path: Path) -> None:
    sweep = tmp_path / "multirun"
    student = variant("student", 300, 20.0, 0.5)
    student["memory_model"] = {"total_bytes": 320_000_000, "fits_budget": False}
    student["decode_bound_ratio"] = 0.61
    student["decode_compiled_tokens_per_s"] = 80.4
    student["decode_compiled_bound_ratio"] = 0.78
    write_run(sweep / "0", [variant("teacher", 500, 10.0, 0.0), student])
    (sweep / "1").mkdir()
    (sweep / "1" / "FAILED").write_text("ModelError: teacher missing\n")
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "report.py"), str(sweep)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    for ext in ("md", "csv", "json", "png"):
        assert (sweep / f"frontier.{ext}").stat().st_size > 0
    md = (sweep / "frontier.md").read_text()
    assert "teacher missing" in md and "Pareto front" in md
    # The report's memory model and bandwidth bound reach the table; older reports show "–".
    assert "| 61% | 80.4 | 78% | no |" in md and "| – | – | – | – |" in md
    rows = list(csv.DictReader(open(sweep / "frontier.csv")))
    by_variant = {r["variant"]: r for r in rows if r["status"] == "ok"}
    assert by_variant["student"]["fits_budget"] == "False"
    assert by_variant["student"]["memory_total_bytes"] == "320000000"
    assert {r["status"] for r in rows} == {"ok", "failed"}
    assert (sweep / "frontier.png").read_bytes()[:4] == b"\x89PNG"


def _with_fidelity(v: dict, text_kl: float, top1: float, nll_ratio: float) -> dict:
    v["fidelity"] = {
        "teacher_text": {"perplexity": 5.0, "kl_to_teacher": text_kl, "top1_agreement": top1},
        "extra:notes.txt": {"perplexity": 9.0, "kl_to_teacher": 2 * text_kl, "top1_agreement": 0.4},
        "generation": {"teacher_nll": 1.5 * nll_ratio, "teacher_nll_ratio": nll_ratio},
    }
    return v


def test_frontier_carries_fidelity_sets_and_ranks_by_any_of_them(tmp_path: Path) -> None:
    from distill.evaluate.frontier import ReportError, write_all

    sweep = tmp_path / "multirun"
    write_run(
        sweep / "0",
        [
            _with_fidelity(variant("teacher", 500, 10.0, 0.0), 0.0, 1.0, 1.0),
            # Better held-out perplexity, worse on the teacher's own text: the rankings differ.
            _with_fidelity(variant("student", 300, 20.0, 0.5), 0.30, 0.55, 1.8),
            _with_fidelity(variant("student-int8_weight_only", 80, 20.5, 0.52), 0.20, 0.60, 1.4),
        ],
    )
    write_run(sweep / "1", [variant("student", 300, 25.0, 0.4)])  # a report without the sets
    runs = find_run_dirs([sweep])
    f = load_points(runs, sweep, metric="teacher_text_kl")
    by = {(p.run, p.variant): p for p in f.points}
    assert by[("0", "student")].fidelity == {
        "teacher_text_ppl": 5.0,
        "teacher_text_kl": 0.30,
        "teacher_text_top1": 0.55,
        "extra:notes.txt_ppl": 9.0,
        "extra:notes.txt_kl": 0.60,
        "extra:notes.txt_top1": 0.4,
        "generation_nll": pytest.approx(2.7),
        "generation_nll_ratio": 1.8,
    }
    # On teacher_text KL int8 (0.20, 80 MB) dominates the float student (0.30, 300 MB).
    front = {k for k, p in by.items() if p.pareto_metric}
    assert front == {("0", "teacher"), ("0", "student-int8_weight_only")}
    written = write_all(f, tmp_path / "out")
    md = (tmp_path / "out" / "frontier.md").read_text()
    assert "## Fidelity to the teacher" in md and "generation_nll_ratio" in md
    ranking = md[md.index("## Ranked by teacher_text_kl (lower is better)") :]
    order = [ln.split(" · ")[1].split(":")[0] for ln in ranking.splitlines() if ln[:1].isdigit()]
    assert order == ["teacher", "student-int8_weight_only", "student", "student"]
    rows = list(csv.DictReader(open(tmp_path / "out" / "frontier.csv")))
    assert {r["fidelity.teacher_text_kl"] for r in rows if r["run"] == "0"} == {"0.0", "0.3", "0.2"}
    assert [r["fidelity.teacher_text_kl"] for r in rows if r["run"] == "1"] == [""]
    import matplotlib.image

    image = matplotlib.image.imread(str(written[3]))
    assert image.shape[1] > image.shape[0] * 2.5  # a third panel for the ranked metric
    # Higher is better for agreement: the teacher (1.0) first.
    top1 = load_points(runs, sweep, metric="teacher_text_top1")
    assert (
        write_all(top1, tmp_path / "top1")
        and "(higher is better)" in (tmp_path / "top1" / "frontier.md").read_text()
    )
    with pytest.raises(ReportError, match="generation_nll_ratio"):
        load_points(runs, sweep, metric="teacher_txt_kl")


def test_report_script_takes_a_metric(tmp_path: Path) -> None:
    sweep = tmp_path / "multirun"
    write_run(
        sweep / "0",
        [
            _with_fidelity(variant("teacher", 500, 10.0, 0.0), 0.0, 1.0, 1.0),
            _with_fidelity(variant("student", 300, 20.0, 0.5), 0.3, 0.55, 1.8),
        ],
    )
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "report.py"),
            str(sweep),
            "--metric",
            "generation_nll_ratio",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "## Ranked by generation_nll_ratio (lower is better)" in proc.stdout
    bad = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "report.py"), str(sweep), "--metric", "nope"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "teacher_text_kl" in bad.stderr


def test_a_points_recipe_names_what_a_method_sweep_varies() -> None:
    from distill.evaluate.frontier import _training

    config = {
        "pair": {"name": "p", "student": {"init": "from_teacher", "layers": [0, 1, 2]}},
        "loss": {"name": "reverse_kl", "kd_ratio": 1.0, "hidden_weight": 0.5},
        "train": {"on_policy_fraction": 0.5, "max_steps": 38},
        "data": {"teacher_generated_fraction": 1.0},
    }
    pair, recipe, kd_ratio, mode = _training(config)
    assert pair == "p (3 layers)" and kd_ratio == 1.0 and mode == "online"
    assert (
        recipe == "reverse_kl · teacher text 100% · on-policy λ=0.5 · hidden cosine ×0.5 · 38 steps"
    )
    plain = _training({"loss": {"name": "forward_kl"}, "train": {"max_steps": 60}})[1]
    assert plain == "forward_kl · 60 steps"
