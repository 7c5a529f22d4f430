"""The report's headline: speed in the runtime each variant deploys to, × the teacher there."""

from __future__ import annotations

from pathlib import Path

from distill.evaluate import report as report_files


def _row(name: str, **fields) -> dict:
    return {
        "name": name,
        "weight_bytes": 1_000_000,
        "perplexity": 20.0,
        "kl_to_teacher": 0.5,
        "top1_agreement": 0.5,
        "params": 1000,
        **fields,
    }


def _report() -> dict:
    return {
        "variants": [
            _row("teacher", decode_tokens_per_s=10.0, decode_compiled_tokens_per_s=40.0),
            _row(
                "teacher-gguf-f16",
                deployed_runtime="llama.cpp 0.3.36",
                deployed_decode_tokens_per_s=50.0,
                deployed_prefill_tokens_per_s=500.0,
            ),
            _row("student", decode_tokens_per_s=20.0, decode_compiled_tokens_per_s=80.0),
            _row(
                "student-gguf-q4_0",
                deployed_runtime="llama.cpp 0.3.36",
                deployed_decode_tokens_per_s=150.0,
            ),
            _row("student-int4_weight_only", decode_tokens_per_s=3.0),
            _row(
                "student-gguf-q8_0",
                deployed_runtime="llama.cpp 0.3.36",
                deployed_decode_tokens_per_s=None,
                llama_cpp_error="llama-cpp-python missing",
            ),
        ]
    }


def _line(table: str, name: str) -> list[str]:
    (line,) = [ln for ln in table.splitlines() if ln.startswith(f"| {name} |")]
    return [c.strip() for c in line.strip("|").split("|")]


def test_speed_is_compared_with_the_teacher_in_the_same_runtime() -> None:
    table = report_files.format_table(_report())
    student = _line(table, "student")
    assert student[1] == "torch.compile" and student[6] == "80.0" and student[7] == "2.00×"
    q4 = _line(table, "student-gguf-q4_0")
    assert q4[1].startswith("llama.cpp") and q4[6] == "150.0" and q4[7] == "3.00×"
    # A torch row that was not compiled has no deployed speed: its eager rate (3.0, slower
    # than fp32's) never stands in the headline, and there is no ratio.
    int4 = _line(table, "student-int4_weight_only")
    assert int4[1] == "PyTorch" and int4[6] == "—" and int4[7] == "—" and int4[8] == "—"
    assert "3.0" not in " ".join(int4)
    notes = "\n".join(report_files._notes(_report()))
    assert "no deployed speed for student-int4_weight_only" in notes


def test_notes_state_only_what_was_measured() -> None:
    # A default run: nothing compiled, the teacher timed as its F16 GGUF only, and that
    # timed-only row (last, with no held-out positions) must not set the count.
    rows = [
        _row("teacher", scored_tokens=8160, decode_tokens=32, prompt_tokens=64),
        _row(
            "student-gguf-q8_0",
            scored_tokens=8160,
            quality_scored=True,
            deployed_runtime="llama.cpp 0.3.36",
            deployed_decode_tokens_per_s=120.0,
        ),
        _row(
            "teacher-gguf-f16",
            scored_tokens=0,
            quality_scored=False,
            decode_tokens=32,
            deployed_runtime="llama.cpp 0.3.36",
            deployed_decode_tokens_per_s=50.0,
        ),
    ]
    notes = "\n".join(report_files._notes({"variants": rows}))
    assert "the same 8,160 held-out" in notes and "32 greedy tokens after a 64-token" in notes
    assert "(its F16 GGUF in llama.cpp)" in notes and "torch.compile" not in notes
    assert "GGUF rows are scored from llama.cpp's own logits" in notes
    compiled = "\n".join(report_files._notes(_report()))
    assert "its F16 GGUF in llama.cpp, the compiled teacher in torch.compile" in compiled
    bare = "\n".join(report_files._notes({"variants": rows[:1]}))
    assert "teacher's speed was not measured" in bare and "GGUF rows are" not in bare


def test_a_gguf_row_llama_cpp_could_not_run_says_so() -> None:
    table = report_files.format_table(_report())
    assert _line(table, "student-gguf-q8_0")[6] == "not run (see notes)"
    notes = "\n".join(report_files._notes(_report()))
    assert "student-gguf-q8_0: not run in llama.cpp: llama-cpp-python missing" in notes


def test_plot_has_two_panels_and_a_legend_entry_per_variant(tmp_path: Path) -> None:
    import matplotlib.image

    rep = _report()
    path = tmp_path / "plot.png"
    report_files.plot_memory_vs_quality(rep, path)
    image = matplotlib.image.imread(str(path))
    assert image.shape[1] > image.shape[0] * 1.8  # two panels side by side


def test_rows_above_the_bandwidth_bound_are_named_with_why() -> None:
    memory_model = {"batch_size": 1, "context_tokens": 8, "total_bytes": 10}
    memory_model |= {"budget_bytes": None, "fits_budget": None}
    rows = [
        _row(
            name,
            runtime="llama.cpp 0.3.36",
            deployed_runtime="llama.cpp 0.3.36, 2 threads",
            deployed_decode_tokens_per_s=rate,
            decode_bound_tokens_per_s=100.0,
            kv_cache_bytes_per_token=1,
            memory_model=memory_model,
        )
        for name, rate in [("teacher-gguf-f16", 50.0), ("student-gguf-q4_0", 114.0)]
    ]
    lines = report_files._memory_section({"variants": rows, "machine": {}})
    (note,) = [ln for ln in lines if "Above 100% of the bound" in ln]
    assert "student-gguf-q4_0" in note and "teacher" not in note.split(".")[0]
    assert "114%" in report_files.format_memory_table({"variants": rows})
    below = [{**r, "deployed_decode_tokens_per_s": 50.0} for r in rows]
    sections = report_files._memory_section({"variants": below, "machine": {}})
    assert not [ln for ln in sections if "Above 100%" in ln]
