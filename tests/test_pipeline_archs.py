"""The whole pipeline on a tiny teacher of every architecture the GGUF writer supports.

For a Llama-3-style llama (``llama3`` RoPE, untied head), Qwen2, Qwen3 (head_dim > hidden /
heads), Gemma 3 (sliding and full layers, a SentencePiece-style tokenizer) and GPT-2 teacher
of 4 layers, a ``from_teacher`` student of layers [0, 3] (narrowed
too, but for GPT-2: fewer MLP channels, and for llama3 and qwen3 one key/value group and a
smaller hidden size) is distilled, quantized (GGUF F16 and Q8_0), evaluated and published in
this process. The report's GGUF rows must have been scored in llama.cpp and have passed the
quantize stage's parity check; the published files must load in llama.cpp with the architecture and
pre-tokenizer of their source and reproduce the transformers student (``final/``) within the
tolerances ``tests/quantize/test_gguf_llama_cpp.py`` measured.

What this adds to the per-file tests there: the student is *cut* from the teacher (its config
derived from the teacher's: Qwen's per-layer ``layer_types``, Llama 3's ``rope_parameters``),
trained, saved and reloaded before it is written, as a real run does.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from distill.config import to_pipeline_config
from distill.quantize.gguf_arch import LAYOUTS
from distill.quantize.parity import LLAMA_CPP_LIMITS, MAX_KL_TO_FLOAT
from tests.conftest import compose, tiny_overrides
from tests.quantize.gguf_models import arch_model, pre_tokenized, sentencepiece_tokenizer
from tests.quantize.test_gguf_llama_cpp import (
    MAX_DELTA_F16_VS_TRANSFORMERS,
    MAX_DELTA_VS_REFERENCE,
    hf_logits,
    llama_cpp_logits,
    max_delta,
)

GGUF_TYPES = ["f16", "q8_0"]
TEACHER_LAYERS = 4  # the student keeps [0, 3] (tiny_overrides)
IDS = [int(i) for i in torch.arange(96) * 37 % 300]  # spread over the 300-token vocabulary


@dataclass(frozen=True)
class Arch:
    """One architecture under test: how its teacher is built, and what its GGUF must say."""

    tokenizer: str  # pre_tokenized's kind, or "sentencepiece" (Gemma's kind)
    tie: bool
    gguf_arch: str  # general.architecture
    gguf_pre: str  # tokenizer.ggml.pre: the pre-tokenizer llama.cpp runs
    # The student's width cut (distill/models/width.py) on top of the depth cut. qwen2's
    # llama.cpp loader assumes heads * head_dim = hidden, so its heads and hidden are kept.
    width: tuple[str, ...] = ()


_MLP = ("pair.student.intermediate_size=96",)
_ALL_WIDTHS = (*_MLP, "pair.student.num_key_value_heads=1", "pair.student.hidden_size=48")


# Llama 3 ships an untied head and its own split regex; Qwen2 and Qwen3 share Qwen's regex.
ARCHS = {
    "llama3": Arch("llama3", tie=False, gguf_arch="llama", gguf_pre="llama-bpe", width=_ALL_WIDTHS),
    "qwen2": Arch("qwen2", tie=True, gguf_arch="qwen2", gguf_pre="qwen2", width=_MLP),
    "qwen3": Arch("qwen2", tie=True, gguf_arch="qwen3", gguf_pre="qwen2", width=_ALL_WIDTHS),
    # Sliding and full layers alternate; the student keeps [0, 3]: one of each (for Gemma 2,
    # whose llama.cpp graph slides every other layer from the first, still alternating).
    "gemma2": Arch(
        "sentencepiece", tie=True, gguf_arch="gemma2", gguf_pre="default", width=_ALL_WIDTHS
    ),
    "gemma3": Arch(
        "sentencepiece", tie=True, gguf_arch="gemma3", gguf_pre="default", width=_ALL_WIDTHS
    ),
    "gpt2": Arch("gpt2", tie=True, gguf_arch="gpt2", gguf_pre="gpt-2"),
}


def save_teacher(arch: str, folder: Path) -> Path:
    """A 4-layer teacher of ``arch`` and its tokenizer (one llama.cpp knows), in ``folder``."""
    spec = ARCHS[arch]
    if spec.tokenizer == "sentencepiece":
        tokenizer = sentencepiece_tokenizer(vocab_size=300)
    else:
        tokenizer = pre_tokenized(spec.tokenizer, vocab_size=300)
    model = arch_model(arch, len(tokenizer), tie=spec.tie, layers=TEACHER_LAYERS)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def arch_overrides(teacher: Path, corpus: Path, cache: Path) -> list[str]:
    """The tiny pipeline (``tiny_overrides``) cut further to what GGUF needs: F16 and Q8_0
    files, no torchao folder, no GPTQ, no bandwidth probe, no batched decode timing; the
    teacher's GGUF F16 row kept; llama.cpp on 1 thread (the machine is shared)."""
    return [
        *tiny_overrides(teacher, corpus, cache),
        "quant.methods=[]",
        f"quant.gguf=[{','.join(GGUF_TYPES)}]",
        "quant.calibration=none",
        "eval.measure_bandwidth=false",
        "eval.decode_batch_size=1",
        "eval.llama_cpp_threads=1",
        "eval.teacher_gguf=true",
    ]


def check_gguf_rows(report: dict) -> None:
    """Every GGUF row of ``report`` was scored and timed in llama.cpp, and each student file
    passed the quantize stage's parity check within its limits (``LLAMA_CPP_LIMITS``,
    ``MAX_KL_TO_FLOAT``)."""
    by_name = {v["name"]: v for v in report["variants"]}
    for name in [f"student-gguf-{t}" for t in GGUF_TYPES] + ["teacher-gguf-f16"]:
        row = by_name[name]
        assert row["llama_cpp_error"] is None, (name, row["llama_cpp_error"])
        assert row["runtime"].startswith("llama.cpp "), (name, row["runtime"])
        assert row["decode_tokens_per_s"] > 0, name
        if name.startswith("student"):
            assert math.isfinite(row["perplexity"]) and row["perplexity"] > 1.0, (name, row)
    # The teacher's F16 file is timed only; its parity was checked when it was exported.
    assert by_name["teacher-gguf-f16"]["parity"]["passed"] is True
    for t in GGUF_TYPES:
        parity = by_name[f"student-gguf-{t}"]["parity"]
        limits = LLAMA_CPP_LIMITS[f"gguf-{t}"]
        assert parity["passed"] is True, (t, parity)
        assert parity["thresholds"]["max_abs_logit_diff"] == limits["max_abs_logit_diff"]
        assert parity["checked_in"].startswith("llama.cpp "), parity["checked_in"]
        assert parity["tokenizer_ids_match"] is True, t
        assert parity["max_abs_logit_diff"] <= limits["max_abs_logit_diff"], (t, parity)
        assert parity["kl_to_in_memory"] <= limits["kl_to_in_memory"], (t, parity)
        assert parity["top1_to_in_memory"] >= limits["min_top1_to_in_memory"], (t, parity)
        assert parity["kl_to_float"] <= MAX_KL_TO_FLOAT[f"gguf-{t}"], (t, parity)


def check_file_header(path: Path, spec: Arch) -> None:
    """``path`` names its source's architecture and pre-tokenizer, and holds the tensors
    that architecture needs (an untied head, Llama 3's ``rope_freqs``)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    assert reader.fields["general.architecture"].contents() == spec.gguf_arch
    assert reader.fields["tokenizer.ggml.pre"].contents() == spec.gguf_pre
    names = {t.name for t in reader.tensors}
    assert ("output.weight" in names) is not spec.tie
    assert ("rope_freqs.weight" in names) is (spec.gguf_arch == "llama")
    if spec.gguf_arch.startswith("gemma"):  # the kept layers' pattern: [0] slides, [3] is full
        key = f"{spec.gguf_arch}.attention.sliding_window_pattern"
        pattern = reader.fields[key].contents()
        assert [bool(x) for x in pattern] == [True, False]


def check_published_files(run_dir: Path, spec: Arch, tmp_path: Path) -> None:
    """The published GGUF files load in llama.cpp and reproduce the transformers student."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.quantize.gguf import export_gguf, reference_model

    published = run_dir / "publish" / "gguf"
    for t in GGUF_TYPES:
        check_file_header(published / f"student-{t}.gguf", spec)
    # final/ loaded as the quantize stage loads it: plain transformers.
    student = AutoModelForCausalLM.from_pretrained(run_dir / "final").eval()
    got = llama_cpp_logits(published / "student-f16.gguf", IDS)
    assert max_delta(got, hf_logits(student, IDS)) < MAX_DELTA_F16_VS_TRANSFORMERS
    # Q8_0 against the float student carrying the file's dequantized weights: the stage's
    # export of final/, redone here, must give the published bytes.
    again = export_gguf(
        student,
        AutoTokenizer.from_pretrained(run_dir / "final"),
        tmp_path / "again-q8_0.gguf",
        "q8_0",
        name=f"{run_dir.name}-student-q8_0",
    )
    assert again.path.read_bytes() == (published / "student-q8_0.gguf").read_bytes()
    got = llama_cpp_logits(published / "student-q8_0.gguf", IDS)
    reference = hf_logits(reference_model(student, again), IDS)
    assert max_delta(got, reference) < MAX_DELTA_VS_REFERENCE["q8_0"]


@pytest.fixture
def one_torch_thread():
    """Torch on one thread for the test: the models are tiny, and on a shared 2-core machine
    two OpenMP threads wait on each other at every op (measured: 2.5x the wall time)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("arch", list(ARCHS))
def test_pipeline_on_each_gguf_architecture(
    tmp_path: Path, tiny_corpus_dir: Path, arch: str
) -> None:
    from distill import pipeline
    from distill.cli import save_config

    teacher = save_teacher(arch, tmp_path / "teacher")
    overrides = arch_overrides(teacher, tiny_corpus_dir, tmp_path / "cache")
    if arch == "llama3":  # one architecture runs the shipped lm-eval task on every row
        overrides += [*LM_EVAL, "eval.lm_eval_limit=4", "eval.lm_eval_max_length=256"]
    cfg = to_pipeline_config(compose([*overrides, *ARCHS[arch].width]))
    run_dir = tmp_path / "run"
    save_config(cfg, run_dir)  # as scripts/pipeline.py does
    pipeline.run(cfg, run_dir)

    report = json.loads((run_dir / "report.json").read_text())
    gguf_rows = [f"student-gguf-{t}" for t in GGUF_TYPES] + ["teacher-gguf-f16"]
    assert [v["name"] for v in report["variants"]] == [
        "teacher",
        "student_init",
        "student",
        *gguf_rows,
    ]
    student = json.loads((run_dir / "final" / "config.json").read_text())
    assert LAYOUTS[student["model_type"]].arch == ARCHS[arch].gguf_arch
    assert student.get("num_hidden_layers", student.get("n_layer")) == 2
    for override in ARCHS[arch].width:  # the width cut reached the saved student
        key, value = override.removeprefix("pair.student.").split("=")
        assert student[key] == int(value), (key, student[key])
    check_gguf_rows(report)
    check_published_files(run_dir, ARCHS[arch], tmp_path)
    if arch == "llama3":
        check_task_scores(report, run_dir)


LM_EVAL = [
    "eval.lm_eval_tasks=[distill_python_mc]",
    f"eval.lm_eval_include=[{Path(__file__).parent / 'lm_eval_tasks'}]",
]


def check_task_scores(report: dict, run_dir: Path) -> None:
    """Every row, the teacher's and the GGUF files' (in llama.cpp) included, has the task's
    scores from the same settings; report.md and the card carry them."""
    import yaml

    for v in report["variants"]:
        scores = v["lm_eval"]["distill_python_mc"]
        assert 0.0 <= scores["acc"] <= 1.0, v["name"]
        assert (scores["examples"], scores["num_fewshot"]) == (4, 2), v["name"]
    assert report["lm_eval"]["tasks"] == ["distill_python_mc"]
    assert "## Task scores (lm-evaluation-harness)" in (run_dir / "report.md").read_text()
    card = (run_dir / "publish" / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    (result,) = meta["model-index"][0]["results"]
    assert result["dataset"]["name"] == "distill_python_mc"
    student = next(v for v in report["variants"] if v["name"] == "student")
    acc = next(m for m in result["metrics"] if m["type"] == "acc")
    assert acc["value"] == round(student["lm_eval"]["distill_python_mc"]["acc"], 4)
