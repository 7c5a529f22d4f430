"""scripts/pipeline.py end to end: a tiny teacher in seconds, and the real one (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, tiny_overrides

REPORT_FIELDS = {
    "name",
    "params",
    "weight_bytes",
    "disk_bytes",
    "peak_memory_bytes",
    "perplexity",
    "kl_to_teacher",
    "top1_agreement",
    "prefill_tokens_per_s",
    "decode_tokens_per_s",
}


def run_pipeline(
    args: list[str], env: dict | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "pipeline.py"), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


# configs/quant/default.yaml: torchao folders, then GGUF files.
DEFAULT_METHODS = ["int8_weight_only", "int4_weight_only"]
DEFAULT_GGUF = ["q8_0", "q4_0"]


def check_run_dir(run_dir: Path, methods: list[str], gguf: list[str] = DEFAULT_GGUF) -> dict:
    report = json.loads((run_dir / "report.json").read_text())
    names = [v["name"] for v in report["variants"]]
    expected = [f"student-{m}" for m in methods] + [f"student-gguf-{t}" for t in gguf]
    assert names == ["teacher", "student_init", "student", *expected]
    for v in report["variants"]:
        assert REPORT_FIELDS <= v.keys(), v.keys()
        assert v["perplexity"] > 1.0 and v["weight_bytes"] > 0
    assert "config" in report
    for f in ("report.md", "memory_vs_quality.png", "metrics.jsonl", "config.yaml"):
        assert (run_dir / f).exists(), f
    assert any((run_dir / "checkpoints").glob("step-*/COMPLETE"))
    publish = run_dir / "publish"
    for f in (
        "README.md",
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "generation_config.json",
    ):
        assert (publish / f).exists(), f
    for m in methods:
        assert (publish / m / "config.json").exists()
    meta = json.loads((publish / "distill_metadata.json").read_text())
    assert {"teacher", "student", "data", "quantization", "config"} <= meta.keys()
    assert meta["quantization"]["config"]["methods"] == report["config"]["quant"]["methods"]
    for t in gguf:
        assert (publish / "gguf" / f"student-{t}.gguf").exists()
    for v in report["variants"][3:]:
        assert v["parity"]["passed"] is True, v["parity"]
        assert 0 < v["bits_per_weight"] < 32
    check_published_parity(run_dir, report)
    return report


def check_published_parity(run_dir: Path, report: dict) -> None:
    """Reloading the published variants in a fresh process gives the report's parity figures."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from distill.quantize import parity

    publish = run_dir / "publish"
    ids = load_file(str(run_dir / "quantized" / "parity_blocks.safetensors"))["ids"]
    artifacts = []
    for v in report["variants"][3:]:
        name = v["name"].removeprefix("student-")
        if name.startswith("gguf-"):
            file = f"student-{name.removeprefix('gguf-')}.gguf"
            artifacts.append(parity.Artifact(name, publish / "gguf", file))
        else:
            artifacts.append(parity.Artifact(name, publish / name))
    reloaded = parity.reload_logits(artifacts, ids, run_dir / "recheck")
    with torch.inference_mode():
        float_logits = AutoModelForCausalLM.from_pretrained(publish)(ids).logits
    for v in report["variants"][3:]:
        name = v["name"].removeprefix("student-")
        got = parity.compare(reloaded[name]["logits"], reloaded[name]["logits"], float_logits, ids)
        assert got["kl_to_float"] == pytest.approx(v["parity"]["kl_to_float"], rel=1e-3, abs=1e-6)
        assert got["ppl_reloaded"] == pytest.approx(v["parity"]["ppl_reloaded"], rel=1e-5)


def test_pipeline_on_tiny_teacher(
    tmp_path: Path, tiny_teacher_dir: Path, tiny_corpus_dir: Path
) -> None:
    run_dir = tmp_path / "run"
    proc = run_pipeline(
        tiny_overrides(tiny_teacher_dir, tiny_corpus_dir, tmp_path / "cache")
        + [f"hydra.run.dir={run_dir}"],
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = check_run_dir(run_dir, DEFAULT_METHODS)
    assert "publish folder:" in proc.stdout and "student-int8_weight_only" in proc.stdout
    by_name = {v["name"]: v for v in report["variants"]}
    assert by_name["teacher"]["kl_to_teacher"] == pytest.approx(0.0, abs=1e-6)
    assert by_name["student-int8_weight_only"]["weight_bytes"] < by_name["student"]["weight_bytes"]

    # Each stage also runs alone on the finished run dir.
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "evaluate.py"),
            f"run_dir={run_dir}",
            "eval.max_blocks=1",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        env={**os.environ, "HYDRA_FULL_ERROR": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_smoke_on_embedded_default(tmp_path: Path) -> None:
    """The real teacher and corpus, a few steps: every stage runs on the default config."""
    run_dir = tmp_path / "run"
    proc = run_pipeline([f"hydra.run.dir={run_dir}", "experiment=quick"], timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = check_run_dir(run_dir, DEFAULT_METHODS)
    by_name = {v["name"]: v for v in report["variants"]}
    assert by_name["student"]["weight_bytes"] <= 0.6 * by_name["teacher"]["weight_bytes"]
    assert (
        by_name["student-int8_weight_only"]["weight_bytes"]
        <= 0.3 * by_name["student"]["weight_bytes"]
    )
    # eval.compiled_decode=[student] by default: compiled, checked against eager, timed.
    assert by_name["student"]["decode_compiled_error"] is None
    assert by_name["student"]["decode_compiled_tokens_per_s"] > 0
    assert by_name["student"]["decode_compiled_max_abs_logit_diff"] < 0.1
    # The published folder loads with plain transformers (no distill import) and generates.
    code = (
        "import sys, transformers as t; p=sys.argv[1]; tok=t.AutoTokenizer.from_pretrained(p); "
        "m=t.AutoModelForCausalLM.from_pretrained(p); "
        "out=m.generate(**tok('The for statement', return_tensors='pt'), max_new_tokens=5, "
        "min_new_tokens=5, do_sample=False); "
        "assert out.shape[1] > 5; print(tok.decode(out[0]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(run_dir / "publish")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
