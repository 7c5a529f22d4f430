"""scripts/pipeline.py end to end: a tiny teacher in seconds, and the real one (slow)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distill.config import to_pipeline_config
from distill.errors import DistillError
from distill.models import Teacher
from tests.conftest import (
    KILL_STAGES,
    REPO,
    REPORT_FIELDS,
    compose,
    tiny_gpt2,
    tiny_overrides,
)


def run_script(
    script: str, args: list[str], env: dict | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    """``scripts/<script>.py args``; ``args`` must hold a ``hydra.run.dir`` under tmp."""
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / f"{script}.py"), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def run_pipeline(
    args: list[str], env: dict | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    return run_script("pipeline", args, env, timeout)


# Printed by torchao / torch at import on a CPU-only torch; distill/__init__.py drops them.
LIBRARY_NOISE = (
    "Failed to load",
    "_C_mxfp8",
    "_C_cutlass_90a",
    "register_constant()",
    "Detected no triton",
)


# configs/quant/default.yaml: torchao folders, then GGUF files.
DEFAULT_METHODS = ["int8_weight_only"]
DEFAULT_GGUF = ["q8_0", "q4_0"]


def check_run_dir(
    run_dir: Path, methods: list[str], gguf: list[str] = DEFAULT_GGUF, *, parity: bool = True
) -> dict:
    report = json.loads((run_dir / "report.json").read_text())
    names = [v["name"] for v in report["variants"]]
    expected = [f"student-{m}" for m in methods] + [f"student-gguf-{t}" for t in gguf]
    # The teacher exported to GGUF F16 and run in llama.cpp, beside the GGUF rows.
    expected += ["teacher-gguf-f16"] if gguf else []
    assert names == ["teacher", "student_init", "student", *expected]
    for v in report["variants"]:
        assert REPORT_FIELDS <= v.keys(), v.keys()
        assert v["weight_bytes"] > 0
        if v.get("quality_scored") is False:  # teacher-gguf-f16: timed only, parity-checked
            assert v["parity"]["passed"] is True and v["decode_tokens_per_s"] > 0
        else:
            assert v["perplexity"] > 1.0
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
    for v in quantized_rows(report):
        assert v["parity"]["passed"] is True, v["parity"]
        assert 0 < v["bits_per_weight"] < 32
    if parity:
        check_published_parity(run_dir, report)
    return report


def quantized_rows(report: dict) -> list[dict]:
    """The report rows of the quantized variants (the ones with quantize-stage parity)."""
    return [v for v in report["variants"][3:] if v["name"].startswith("student-")]


def in_memory_logits(run_dir: Path) -> dict[str, torch.Tensor]:
    """Each variant's logits ``(B, T, V)`` on the parity blocks, from the in-memory model it
    was written from, as the quantize stage holds them: the stage (deterministic) runs again
    on a copy of ``final/`` and the references it hands the parity check are kept."""
    from omegaconf import OmegaConf
    from safetensors.torch import load_file

    from distill.quantize import parity
    from distill.quantize import stage as quantize

    cfg = to_pipeline_config(OmegaConf.load(run_dir / "config.yaml"))
    again = run_dir / "requantize"
    shutil.copytree(run_dir / "final", again / "final")
    captured: dict[str, torch.Tensor] = {}

    def keep(records, artifacts, in_memory, *args, **kwargs) -> None:
        captured.update({name: load_file(str(p))["logits"] for name, p in in_memory.items()})

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(parity, "check_artifacts", keep)
        quantize.run(cfg, again)
    shutil.rmtree(again)
    return captured


def check_published_parity(run_dir: Path, report: dict) -> None:
    """Reloading the published variants in a fresh process gives the report's parity figures."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from distill.quantize import parity

    publish = run_dir / "publish"
    ids = load_file(str(run_dir / "quantized" / "parity_blocks.safetensors"))["ids"]
    folders, logits = [], {}
    in_memory = in_memory_logits(run_dir)
    for v in quantized_rows(report):
        name = v["name"].removeprefix("student-")
        if name.startswith("gguf-"):  # checked in llama.cpp, the runtime it is written for
            file = publish / "gguf" / f"student-{name.removeprefix('gguf-')}.gguf"
            logits[name] = parity.llama_cpp_logits(file, ids, in_memory[name].shape[-1])
        else:
            folders.append(parity.Artifact(name, publish / name))
    reloaded = parity.reload_logits(folders, ids, run_dir / "recheck")
    logits |= {name: out["logits"] for name, out in reloaded.items()}
    with torch.inference_mode():
        float_logits = AutoModelForCausalLM.from_pretrained(publish)(ids).logits
    for v in quantized_rows(report):
        name = v["name"].removeprefix("student-")
        # The reference is the quantized model the stage held, not the float one.
        assert not torch.equal(in_memory[name], float_logits), name
        got = parity.compare(logits[name], in_memory[name], float_logits, ids)
        want = v["parity"]
        for key in ("max_abs_logit_diff", "kl_to_in_memory", "kl_to_float"):
            assert got[key] == pytest.approx(want[key], rel=1e-3, abs=1e-6), (name, key)
        for key in ("ppl_in_memory", "ppl_reloaded", "ppl_float"):
            assert got[key] == pytest.approx(want[key], rel=1e-5), (name, key)


def test_pipeline_on_tiny_teacher(tmp_path: Path, resume_chain: dict) -> None:
    """The tiny teacher's run dir after the resume chain (tests/conftest.py): every stage ran
    through scripts/pipeline.py, quietly; then each later stage runs alone on it, rebuilding
    what it owns, and the published files give the parity figures the report holds."""
    for stage in KILL_STAGES:
        stderr = resume_chain[stage]["stderr"]
        assert not [n for n in LIBRARY_NOISE if n in stderr], (stage, stderr[-3000:])
        assert "fontManager" not in stderr + resume_chain[stage]["stdout"], stage
    done = resume_chain["none"]
    assert done["returncode"] == 0, done["stderr"][-3000:]
    assert "publish folder:" in done["stdout"] and "student-int8_weight_only" in done["stdout"]
    rd = tmp_path / "run"
    shutil.copytree(resume_chain["run_dir"], rd)
    report = check_run_dir(rd, DEFAULT_METHODS, ["q8_0"], parity=False)
    by_name = {v["name"]: v for v in report["variants"]}
    assert by_name["teacher"]["kl_to_teacher"] == pytest.approx(0.0, abs=1e-6)
    assert by_name["student-int8_weight_only"]["weight_bytes"] < by_name["student"]["weight_bytes"]

    stages = [
        ("quantize", [rd / "quantized"], [rd / "quantized" / "quantize.json"]),
        ("evaluate", [rd / "report.json", rd / "report.md"], [rd / "report.json"]),
        ("publish", [rd / "publish"], [rd / "publish" / "distill_metadata.json"]),
    ]
    for script, remove, rebuilt in stages:
        for path in remove:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        extra = ["eval.max_blocks=1"] if script == "evaluate" else []
        proc = run_script(
            script,
            [f"run_dir={rd}", f"hydra.run.dir={tmp_path}/{script}-alone", *extra],
            env={"HYDRA_FULL_ERROR": "1"},
            timeout=300,
        )
        assert proc.returncode == 0, (script, proc.stderr[-3000:])
        assert all(p.exists() for p in rebuilt), (script, rebuilt)
    report = check_run_dir(rd, DEFAULT_METHODS, ["q8_0"])
    assert report["config"]["eval"]["max_blocks"] == 1  # the stage's own override applied


@pytest.fixture(scope="module")
def tiny_gpt2_teacher_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:
    folder = tmp_path_factory.mktemp("tiny_gpt2_teacher")
    model = tiny_gpt2(len(tokenizer), layers=4)
    # GGUF writes GPT-2 now, but not a ReLU one (llama.cpp's gpt2 graph is tanh GELU).
    model.config.activation_function = "relu"
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def no_weights_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any model-weight load fail the test: pre-flight must decide from configs."""
    from transformers import AutoModelForCausalLM

    def refuse(*args, **kwargs):
        raise AssertionError("pre-flight loaded model weights")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)


def test_gguf_of_a_gpt2_student_fails_before_training(
    tmp_path: Path,
    tiny_gpt2_teacher_dir: Path,
    tiny_corpus_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from distill.preflight import preflight
    from distill.quantize.gguf import GGUFExportError
    from distill.train import loop

    overrides = tiny_overrides(tiny_gpt2_teacher_dir, tiny_corpus_dir, tmp_path / "cache")
    cfg = to_pipeline_config(compose(overrides))  # tiny_overrides' quant.gguf=[q8_0, q4_0]
    run_dir = tmp_path / "run"
    with pytest.raises(GGUFExportError) as err:
        loop.run(cfg, run_dir)
    msg = str(err.value)
    assert "quant.gguf=['q8_0', 'q4_0']" in msg and "gpt2" in msg and "quant.gguf=[]" in msg
    assert not run_dir.exists() or not any(run_dir.iterdir()), list(run_dir.iterdir())
    # The fix the message names passes, deciding from configs alone.
    no_weights_loaded(monkeypatch)
    fixed = to_pipeline_config(compose([*overrides, "quant.gguf=[]"]))
    preflight(fixed, Teacher(fixed.pair.teacher, tmp_path / "cache"))
    with pytest.raises(GGUFExportError):
        preflight(cfg, Teacher(cfg.pair.teacher, tmp_path / "cache"))


def test_layers_the_teacher_lacks_fail_before_weights_load(
    tmp_path: Path,
    tiny_teacher_dir: Path,
    tiny_corpus_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from distill.models.load import ModelError
    from distill.preflight import preflight

    overrides = [
        o
        for o in tiny_overrides(tiny_teacher_dir, tiny_corpus_dir, tmp_path / "cache")
        if not o.startswith("pair.student.layers")
    ]  # the default pair file's 30-layer list on a 4-layer teacher
    no_weights_loaded(monkeypatch)
    cfg = to_pipeline_config(compose(overrides))
    with pytest.raises(ModelError) as err:
        preflight(cfg, Teacher(cfg.pair.teacher, tmp_path / "cache"))
    outside = [i for i in cfg.pair.student.layers if i >= 4]  # the tiny teacher has 4
    assert outside and f"pair.student.layers has {outside} outside" in str(err.value)
    assert "pair.student.num_layers" in str(err.value)


def test_commands_print_no_known_library_noise(tmp_path: Path) -> None:
    """torchao's CUDA-extension load failures and torch's pytree deprecation are dropped
    (distill/__init__.py); any other warning still shows."""
    code = (
        # Handlers on the root logger, as a Hydra command has (torchao's loggers have a
        # NullHandler of their own, so without one nothing would print either way).
        "import logging; logging.basicConfig();"
        "import torch.utils._pytree as p, distill.quantize.stage, torchao.quantization;"
        "import torchao.kernel.intmm;"
        "logging.getLogger('torchao').warning('another torchao warning');"
        "p.log.warning('another pytree warning')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not [n for n in LIBRARY_NOISE if n in proc.stderr], proc.stderr
    assert "another torchao warning" in proc.stderr and "another pytree warning" in proc.stderr


@pytest.mark.slow
def test_smoke_on_embedded_default(tmp_path: Path) -> None:
    """The real teacher and corpus, a few steps: every stage runs on the default config."""
    run_dir = tmp_path / "run"
    proc = run_pipeline([f"hydra.run.dir={run_dir}", "experiment=quick"], timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Every artifact passed the quantize stage's own parity check (fresh process, llama.cpp);
    # re-deriving those figures from the published files is test_pipeline_on_tiny_teacher's
    # (here it would quantize the real student a second time, GPTQ included: ~30 s).
    report = check_run_dir(run_dir, DEFAULT_METHODS, parity=False)
    by_name = {v["name"]: v for v in report["variants"]}
    assert by_name["student"]["weight_bytes"] <= 0.6 * by_name["teacher"]["weight_bytes"]
    assert (
        by_name["student-int8_weight_only"]["weight_bytes"]
        <= 0.3 * by_name["student"]["weight_bytes"]
    )
    # The real teacher has a chat template: it wrote the general set's questions, and every
    # torch and GGUF row answered them.
    for name in ("student", "student-gguf-q8_0"):
        assert by_name[name]["fidelity"]["general"]["prompts"] >= 1, name
    # The student's Q4_0 file drafted for the teacher's F16 in llama.cpp, timed (k = 2).
    draft = report["draft_speed"]
    assert draft["error"] is None, draft
    assert [r["draft_length"] for r in draft["by_draft_length"]] == [2]
    assert draft["teacher_s"] > 0 and draft["by_draft_length"][0]["speedup"] > 0, draft
    assert "Timed in llama.cpp" in (run_dir / "report.md").read_text()
    # experiment=quick compiles nothing (see its comment): the torch rows deploy eager, and
    # say so.
    assert "not in eval.compiled_decode" in by_name["student"]["deployed_runtime"]
    # Eager timing is off by default: no torch row was timed, and each says why.
    for name in ("teacher", "student", "student-int8_weight_only"):
        row = by_name[name]
        assert row["decode_tokens_per_s"] is None, name
        assert row["eager_timing"] == "not timed: eval.eager_timing is off", name
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


def test_an_unknown_lm_eval_task_fails_before_training(
    tmp_path: Path,
    tiny_gpt2_teacher_dir: Path,
    tiny_corpus_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import distill.evaluate.tasks as tasks_mod
    from distill.train import loop

    # The shipped local task's index stands in for lm-eval's own (seconds to build).
    local = tasks_mod._manager((str(REPO / "tests" / "lm_eval_tasks"),), False)
    monkeypatch.setattr(tasks_mod, "_manager", lambda include, defaults: local)
    overrides = tiny_overrides(tiny_gpt2_teacher_dir, tiny_corpus_dir, tmp_path / "cache")
    cfg = to_pipeline_config(
        compose([*overrides, "quant.gguf=[]", "eval.lm_eval_tasks=[distill_pythn_mc]"])
    )
    run_dir = tmp_path / "run"
    with pytest.raises(DistillError, match="distill_pythn_mc"):
        loop.run(cfg, run_dir)
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "final").exists()
