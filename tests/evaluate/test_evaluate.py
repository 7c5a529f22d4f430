"""The evaluate stage on a microscopic run dir: report schema, variants, errors."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from distill.config import (
    EvalConfig,
    PairConfig,
    PipelineConfig,
    QuantConfig,
    StudentConfig,
    TeacherConfig,
)
from distill.data import PackedSplits
from distill.evaluate import report as report_files
from distill.evaluate import stage as evaluate
from distill.evaluate.rows import evaluate_variant
from distill.evaluate.stage import EvalError
from distill.metrics import TeacherSide
from distill.models import Teacher
from distill.quantize.folder import quantize_folder
from tests.conftest import REPORT_FIELDS, WORD_VOCAB, tiny_tokenizer
from tests.conftest import word_llama as tiny_model

VOCAB = WORD_VOCAB
REQUIRED_FIELDS = REPORT_FIELDS


# --------------------------------------------------------------------------------------------
# The stage on a tiny run dir
# --------------------------------------------------------------------------------------------


def tiny_config(cache_dir: Path, **fidelity) -> PipelineConfig:
    """The tiny run's config; ``fidelity`` overrides the (small) fidelity-set settings."""
    return PipelineConfig(
        pair=PairConfig(
            name="tiny",
            teacher=TeacherConfig(name_or_path="unused-when-injected"),
            student=StudentConfig(num_layers=1),
        ),
        quant=QuantConfig(methods=["int8_weight_only"]),
        eval=EvalConfig(
            max_blocks=5,
            batch_size=2,
            prompt_tokens=8,
            decode_tokens=4,
            prefill_tokens=16,
            repeats=1,
            eager_timing=True,  # the timing fields are checked below
            decode_batch_size=2,
            memory_context_tokens=100,
            # Between the 1-layer students' and the 2-layer teacher's weights + KV cache.
            memory_budget_bytes=80_000,
            # Small fidelity sets (tests/evaluate/test_fidelity.py checks them in depth).
            teacher_text_prompts=4,
            teacher_text_tokens=6,
            generation_prompts=3,
            generation_tokens=5,
            fidelity_prompt_tokens=4,
            **fidelity,
        ),
        cache_dir=str(cache_dir),
    )


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("run")
    tokenizer = tiny_tokenizer()
    for name, seed, layers in (("student_init", 1, 1), ("final", 2, 1)):
        tiny_model(seed, layers).save_pretrained(str(run_dir / name))
        tokenizer.save_pretrained(str(run_dir / name))
    result = quantize_folder(
        run_dir / "final",
        run_dir / "quantized" / "int8_weight_only",
        "int8_weight_only",
        include_embeddings=False,
    )
    (run_dir / "quantized" / "quantize.json").write_text(json.dumps([result]))
    return run_dir


def test_run_writes_report_with_exact_schema(tiny_run: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path)
    torch.manual_seed(3)
    val = torch.randint(0, 128, (6, 16))
    teacher = Teacher.of(tiny_model(0), tiny_tokenizer())
    report = evaluate.run(cfg, tiny_run, teacher=teacher, splits=PackedSplits(val, val))

    on_disk = json.loads((tiny_run / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert set(on_disk) == {
        *("variants", "fidelity", "training", "machine", "config", "student", "stamp"),
        "draft_speed",
    }
    # No GGUF rows here, so no teacher F16 to draft for: the report says so.
    assert "teacher GGUF F16" in on_disk["draft_speed"]["error"]
    # final/'s shape (1 layer) beside the teacher's (tiny_model's default depth)
    assert on_disk["student"]["num_layers"] == [1, teacher.model.config.num_hidden_layers]
    assert set(on_disk["fidelity"]) == {"teacher_text", "generation"}
    bandwidth = on_disk["machine"]["bandwidth_bytes_per_s"]
    assert bandwidth > 1e8
    assert on_disk["training"]["teacher_mode"] == cfg.train.teacher_mode
    assert on_disk["training"]["loss"] == on_disk["config"]["loss"]
    assert on_disk["config"] == json.loads(json.dumps(asdict(cfg)))
    names = [v["name"] for v in on_disk["variants"]]
    assert names == ["teacher", "student_init", "student", "student-int8_weight_only"]
    for v in on_disk["variants"]:
        assert REQUIRED_FIELDS <= set(v), REQUIRED_FIELDS - set(v)
        assert set(v["fidelity"]) == {"teacher_text", "generation"}
        assert math.isfinite(v["fidelity"]["generation"]["teacher_nll_ratio"])
        assert v["scored_tokens"] == 5 * 15  # max_blocks blocks, T - 1 positions each
        assert v["perplexity"] > 1.0 and math.isfinite(v["perplexity"])
        assert v["peak_memory_bytes"] >= 0
        if v["name"] == "student_init":  # the student's architecture and dtype: timed there
            assert v["decode_tokens_per_s"] is None and "timed there" in v["eager_timing"]
            continue
        assert v["prefill_tokens_per_s"] > 0 and v["decode_tokens_per_s"] > 0
        assert 1 <= v["decode_timed_runs"] <= cfg.eval.repeats
        # Memory model: K and V, fp32, 2 kv heads x head dim 8 per layer.
        layers = 2 if v["name"] == "teacher" else 1
        assert v["kv_cache_bytes_per_token"] == layers * 2 * 8 * 2 * 4
        mm = v["memory_model"]
        assert mm["total_bytes"] == v["weight_bytes"] + 100 * v["kv_cache_bytes_per_token"]
        assert mm["fits_budget"] is (mm["total_bytes"] <= 80_000)
        # Bound: bandwidth / bytes read per token (weights + K/V of the mean cached context).
        context = v["prompt_tokens"] + (v["decode_tokens"] - 1) / 2
        read = v["loaded_weight_bytes"] + v["kv_cache_bytes_per_token"] * context
        assert v["decode_bound_tokens_per_s"] == pytest.approx(bandwidth / read)
        assert v["decode_bound_ratio"] == pytest.approx(
            v["decode_tokens_per_s"] / v["decode_bound_tokens_per_s"]
        )
        assert v["decode_batch_size"] == 2 and v["decode_tokens_per_s_batch"] > 0
        assert v["decode_bound_tokens_per_s_batch"] == pytest.approx(
            2 * bandwidth / (v["loaded_weight_bytes"] + 2 * v["kv_cache_bytes_per_token"] * context)
        )
    fits = [v["memory_model"]["fits_budget"] for v in on_disk["variants"]]
    assert fits == [False, True, True, True], fits
    teacher, _, student, quantized = on_disk["variants"]
    assert teacher["kl_to_teacher"] == pytest.approx(0.0, abs=1e-5)
    assert teacher["top1_agreement"] == 1.0
    assert teacher["disk_bytes"] is None  # injected, no folder
    assert student["kl_to_teacher"] > 0
    assert student["disk_bytes"] > 0
    assert quantized["weight_bytes"] < student["weight_bytes"]
    # Embeddings left in float: quantize.json says so and the report carries it.
    skipped = {m["name"] for m in quantized["skipped_modules"]}
    assert "model.embed_tokens" in skipped
    assert "model.embed_tokens" in (tiny_run / "report.md").read_text()
    # int8 weights barely move the logits of the model they came from.
    assert quantized["perplexity"] == pytest.approx(student["perplexity"], rel=0.05)

    md = (tiny_run / "report.md").read_text()
    assert "| student-int8_weight_only |" in md
    assert f"{student['perplexity']:.2f}" in md
    assert (tiny_run / "memory_vs_quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report_files.format_table(report) in md
    assert report_files.format_memory_table(report) in md and "**no**" in md


def test_missing_final_names_the_fix(tmp_path: Path) -> None:
    teacher = Teacher.of(tiny_model(0), tiny_tokenizer())
    with pytest.raises(EvalError, match="scripts/distill.py"):
        evaluate.run(tiny_config(tmp_path), tmp_path, teacher=teacher)


def test_evaluate_variant_rejects_misaligned_teacher_batches() -> None:
    model = tiny_model(0)
    blocks = torch.randint(0, 128, (4, 8))
    whole = TeacherSide.of([torch.zeros(4 * 7, VOCAB)])  # one batch of 4, not two of 2
    with pytest.raises(ValueError, match="same blocks and batch size"):
        evaluate_variant("x", model, blocks, [whole], EvalConfig(batch_size=2))
    with pytest.raises(ValueError, match="blocks or masks differ"):
        evaluate_variant("x", model, blocks, [whole[:14], whole[:13]], EvalConfig(batch_size=2))


def test_run_loads_teacher_and_data_when_not_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import distill.data
    import distill.models.teacher
    from distill.caches import cache_root

    cfg = tiny_config(tmp_path / "cache", fidelity=[])
    tokenizer = tiny_tokenizer()
    calls: dict[str, object] = {}
    real_load = distill.models.teacher.load_model

    def fake_load_model(source, **kwargs):
        calls["teacher"] = source
        return tiny_model(0)

    def fake_prepare_data(data_cfg, tok, cache_dir):
        calls["data"] = (data_cfg, tok, cache_dir)
        return distill.data.PackedSplits(
            train=torch.zeros(1, 16).long(), val=torch.ones(3, 16).long()
        )

    monkeypatch.setattr(distill.models.teacher, "load_model", fake_load_model)
    monkeypatch.setattr(distill.models.teacher, "teacher_source", lambda cfg, cache: "tiny")
    monkeypatch.setattr(distill.models.teacher, "load_tokenizer", lambda src, **kw: tokenizer)
    monkeypatch.setattr(distill.data, "prepare_data", fake_prepare_data)
    tiny_model(2, 1).save_pretrained(str(tmp_path / "final"))
    report = evaluate.run(cfg, tmp_path)
    assert real_load is not fake_load_model
    assert calls["teacher"] == "tiny"
    assert calls["data"] == (cfg.data, tokenizer, cache_root(cfg))
    # No student_init/ and no quantized/: only what exists is evaluated.
    assert [v["name"] for v in report["variants"]] == ["teacher", "student"]
    assert report["variants"][1]["scored_tokens"] == 3 * 15
