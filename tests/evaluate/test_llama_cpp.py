"""llama.cpp as the runtime of GGUF files: the wrapper, and the evaluate stage's GGUF rows."""

from __future__ import annotations

import json
import math
import sys
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
from distill.evaluate import stage as evaluate
from distill.evaluate.rows import deployed_fields
from distill.models import Teacher, llama_cpp
from distill.quantize.gguf import export_gguf, gguf_tensor_bytes
from distill.run_dir import RunDir
from tests.conftest import CORPUS, make_tokenizer, tiny_llama

VOCAB = 300  # make_tokenizer(300): byte alphabet + <|endoftext|> + merges (llama.cpp needs them)
# llama.cpp on an F16 file vs transformers on the same (fp16-rounded) weights, tiny llama:
# measured 1.6e-4 max |dlogit| (logits ~0.7 in size); ggml rounds activations to fp16 for its
# F16 matmuls and keeps an F16 KV cache, which fp32 accumulation cannot undo.
F16_LOGIT_ATOL = 2e-3


@pytest.fixture(scope="module")
def bpe() -> object:
    return make_tokenizer(VOCAB)


@pytest.fixture(scope="module")
def f16_file(tmp_path_factory: pytest.TempPathFactory, bpe) -> tuple[Path, torch.nn.Module]:
    from distill.quantize.gguf import reference_model

    model = tiny_llama(VOCAB, layers=2, seed=1)
    export = export_gguf(model, bpe, tmp_path_factory.mktemp("gguf") / "m-f16.gguf", "f16")
    return export.path, reference_model(model, export)


def _blocks(n: int = 3, t: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


def test_logits_equal_transformers_on_an_f16_file(f16_file) -> None:
    path, reference = f16_file
    blocks = _blocks()
    with torch.inference_mode():
        want = reference(blocks).logits.float()
    got = llama_cpp.gguf_logits(path, blocks, threads=2)
    assert [tuple(g.shape) for g in got] == [(16, VOCAB)] * 3
    torch.testing.assert_close(torch.stack(got), want, atol=F16_LOGIT_ATOL, rtol=0)
    # Each block starts from an empty cache: the last block alone gives the same logits.
    alone = llama_cpp.gguf_logits(path, blocks[2:], threads=2)[0]
    torch.testing.assert_close(alone, got[2], atol=1e-5, rtol=0)
    with llama_cpp.open_gguf(path, n_ctx=16, threads=1) as rt:
        # One open file serves every block, cut to the vocabulary asked for.
        cut = [x.clone() for x in rt.iter_logits(blocks.tolist(), vocab_size=VOCAB - 40)]
        assert [tuple(x.shape) for x in cut] == [(16, VOCAB - 40)] * 3
        torch.testing.assert_close(cut[1], got[1][:, : VOCAB - 40], atol=1e-5, rtol=0)
        assert rt.params() == sum(p.numel() for p in reference.parameters())
        assert rt.tensor_bytes() == gguf_tensor_bytes(path)
        with pytest.raises(ValueError, match="do not fit"):
            next(rt.iter_logits([list(range(17))]))
    with pytest.raises(llama_cpp.LlamaCppError, match="fewer than"):
        llama_cpp.gguf_logits(path, blocks[:1], vocab_size=VOCAB + 1)


def test_tokenizer_embedded_in_the_file_matches_the_source(f16_file, bpe) -> None:
    text = "The quick brown fox<|endoftext|> jumps over 1234 lazy dogs."
    assert llama_cpp.gguf_tokenize(f16_file[0], text) == bpe(text)["input_ids"]


def test_speed_is_timed_by_llama_cpp(f16_file) -> None:
    path, _ = f16_file
    flat = _blocks(1, 48)[0]
    with llama_cpp.open_gguf(path, n_ctx=32, threads=1) as rt:
        speed = rt.speed(flat[:8], 6, repeats=2, prefill=flat[:32])
        assert rt.llm._logits_all  # the timed passes switch per-position logits off for themselves
        with pytest.raises(ValueError, match=">= 2 tokens"):
            rt.speed(flat[:1], 4, repeats=1)
    assert speed["prefill_tokens"] == 32 and speed["prompt_tokens"] == 8
    assert speed["decode_tokens"] == 6 and speed["threads"] == 1
    assert speed["runtime"] == f"llama.cpp {__import__('llama_cpp').__version__}"
    # A 2-layer, 32-wide model: thousands of tokens/s (measured 7k-50k; overheads dominate).
    assert 100 < speed["decode_tokens_per_s"] < 1e7
    assert 100 < speed["prefill_tokens_per_s"] < 1e7


def test_a_file_llama_cpp_refuses_is_named_with_its_reason(f16_file, tmp_path: Path) -> None:
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(f16_file[0].read_bytes()[:4096])
    with pytest.raises(llama_cpp.LlamaCppError) as err:
        llama_cpp.gguf_logits(bad, _blocks(1))
    assert str(bad) in str(err.value) and "failed to read" in str(err.value)
    # llama.cpp's log goes back to the binding afterwards: a good file still loads.
    assert len(llama_cpp.gguf_logits(f16_file[0], _blocks(1))) == 1


def test_missing_binding_names_the_fix(monkeypatch: pytest.MonkeyPatch, f16_file) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp raises ImportError
    problem = llama_cpp.llama_cpp_problem()
    assert problem is not None and "pip install llama-cpp-python==0.3.36" in problem
    with pytest.raises(llama_cpp.LlamaCppError, match="pip install llama-cpp-python"):
        llama_cpp.gguf_logits(f16_file[0], _blocks(1))


def test_torch_rows_deploy_compiled_decode_when_measured() -> None:
    eager = {"decode_tokens_per_s": 10.0, "prefill_tokens_per_s": 500.0}
    # Not compiled: no deployed speed at all (the eager rate is a diagnostic, never shown as
    # the row's speed), and the row says why.
    assert deployed_fields(eager)["runtime"] == "PyTorch"
    assert deployed_fields(eager)["deployed_decode_tokens_per_s"] is None
    assert deployed_fields(eager)["deployed_prefill_tokens_per_s"] is None
    assert "not in eval.compiled_decode" in deployed_fields(eager)["deployed_runtime"]
    failed = {**eager, "decode_compiled_tokens_per_s": None, "decode_compiled_error": "boom"}
    assert "failed" in deployed_fields(failed)["deployed_runtime"]
    assert deployed_fields(failed)["deployed_decode_tokens_per_s"] is None
    compiled = {**eager, "decode_compiled_tokens_per_s": 40.0}
    fields = deployed_fields(compiled)
    assert fields["runtime"] == "torch.compile" and fields["deployed_decode_tokens_per_s"] == 40.0
    assert fields["deployed_prefill_tokens_per_s"] == 500.0


def test_thread_count_is_validated() -> None:
    assert EvalConfig(llama_cpp_threads=None).problems() == []
    assert EvalConfig(llama_cpp_threads=2).problems() == []
    problems = EvalConfig(llama_cpp_threads=0).problems()
    assert len(problems) == 1 and "eval.llama_cpp_threads=0" in problems[0]


# --------------------------------------------------------------------------------------------
# The evaluate stage's GGUF rows
# --------------------------------------------------------------------------------------------


def _cfg(cache: Path, gguf: list[str], extra: list[str] | None = None) -> PipelineConfig:
    return PipelineConfig(
        pair=PairConfig(
            name="tiny",
            teacher=TeacherConfig(name_or_path="unused-when-injected"),
            student=StudentConfig(num_layers=1),
        ),
        quant=QuantConfig(methods=[], gguf=gguf),
        eval=EvalConfig(
            max_blocks=3,
            batch_size=2,
            prompt_tokens=8,
            decode_tokens=4,
            prefill_tokens=16,
            repeats=1,
            decode_batch_size=1,
            llama_cpp_threads=1,
            teacher_text_prompts=3,
            teacher_text_tokens=6,
            generation_prompts=3,
            generation_tokens=6,
            fidelity_prompt_tokens=6,
            extra_corpora=extra or [],
        ),
        cache_dir=str(cache),
    )


@pytest.fixture(scope="module")
def gguf_run(tmp_path_factory: pytest.TempPathFactory, bpe) -> tuple[Path, Path]:
    """A run dir with final/ (1 layer) quantized by the real quantize stage to Q8_0 and Q4_0,
    with the teacher's GGUF F16 exported (and checked) into its own cache; and that cache.

    Teacher and student are untied: a tied random tiny model greedily repeats its last input
    token, whatever its weights, so every model (and every runtime) would answer alike."""
    from distill.quantize import stage as quantize

    root = tmp_path_factory.mktemp("run")
    cache = tmp_path_factory.mktemp("cache")
    rd = RunDir(root)
    student = tiny_llama(VOCAB, layers=1, seed=2, tie=False)
    student.save_pretrained(str(rd.final))
    bpe.save_pretrained(str(rd.final))
    cfg = _cfg(cache, ["q8_0", "q4_0"])
    val = _blocks(4, 16, seed=5)
    teacher = Teacher.of(_teacher(), bpe)
    quantize.run(cfg, root, teacher=teacher, splits=PackedSplits(train=val, val=val))
    return root, cache


def _teacher() -> torch.nn.Module:
    """Untied, with a sharp output head: it is confident of its own greedy answers, so its
    NLL of another model's answers is far above its NLL of its own."""
    model = tiny_llama(VOCAB, layers=2, seed=0, tie=False)
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    return model


def _evaluate(cfg: PipelineConfig, run_dir: Path, bpe, val: torch.Tensor) -> dict:
    (run_dir / "report.json").unlink(missing_ok=True)  # each call evaluates again
    return evaluate.run(
        cfg, run_dir, teacher=Teacher.of(_teacher(), bpe), splits=PackedSplits(val, val)
    )


def test_gguf_rows_run_in_llama_cpp_beside_the_teacher_in_f16(
    gguf_run: tuple[Path, Path], tmp_path: Path, bpe
) -> None:
    run_dir, cache = gguf_run
    notes = tmp_path / "notes.txt"
    notes.write_text(CORPUS)
    cfg = _cfg(cache, ["q8_0", "q4_0"], extra=[str(notes)])
    val = _blocks(4, 16, seed=5)
    report = _evaluate(cfg, run_dir, bpe, val)
    rows = {v["name"]: v for v in report["variants"]}
    _check_gguf_fidelity(report, rows)
    assert list(rows) == [
        "teacher",
        "student",
        "student-gguf-q8_0",
        "student-gguf-q4_0",
        "teacher-gguf-f16",
    ]
    runtime = llama_cpp.runtime_name()
    for name in ("student-gguf-q8_0", "student-gguf-q4_0", "teacher-gguf-f16"):
        row = rows[name]
        assert row["runtime"] == runtime and row["llama_cpp_error"] is None, row
        assert row["decode_tokens_per_s"] > 0 and row["prefill_tokens_per_s"] > 0
        assert row["deployed_decode_tokens_per_s"] == row["decode_tokens_per_s"]
        assert (row["prompt_tokens"], row["decode_tokens"], row["prefill_tokens"]) == (8, 4, 16)
        assert row["llama_cpp_threads"] == 1
        assert row["llama_cpp_threads_source"] == "eval.llama_cpp_threads"
        assert (
            row["weight_bytes"]
            == row["loaded_weight_bytes"]
            == gguf_tensor_bytes(Path(row["folder"]))
        )
        layers = 2 if name.startswith("teacher") else 1
        assert row["kv_cache_bytes_per_token"] == layers * 2 * 8 * 2 * 2  # F16 K and V
        assert row["decode_bound_ratio"] == pytest.approx(
            row["decode_tokens_per_s"] / row["decode_bound_tokens_per_s"]
        )
    for name in ("student-gguf-q8_0", "student-gguf-q4_0"):
        assert rows[name]["scored_tokens"] == 3 * 15 and math.isfinite(rows[name]["perplexity"])
    assert rows["student-gguf-q8_0"]["kl_to_teacher"] == pytest.approx(
        rows["student"]["kl_to_teacher"], rel=0.05
    )
    # The teacher's F16 file is timed only; its parity against the teacher was checked when
    # the quantize stage exported it: the same weights in both runtimes.
    f16 = rows["teacher-gguf-f16"]
    assert f16["quality_scored"] is False and math.isnan(f16["perplexity"])
    assert f16["parity"]["passed"] is True and f16["parity"]["kl_to_float"] < 1e-4
    assert f16["params"] == rows["teacher"]["params"]
    # Not compiled: the torch rows show no deployed speed, and (eager timing off by default)
    # no eager one either.
    assert rows["student"]["runtime"] == "PyTorch"
    assert rows["student"]["deployed_decode_tokens_per_s"] is None
    assert rows["student"]["decode_tokens_per_s"] is None
    machine = report["machine"]["llama_cpp"]
    assert machine["runtime"] == runtime and machine["threads"] == 1
    assert machine["threads_source"] == "eval.llama_cpp_threads"
    cached = Path(machine["teacher_gguf"])
    assert cached.parent == cache / "gguf" and cached.name.endswith("-f16.gguf")
    md = (run_dir / "report.md").read_text()
    assert "teacher-gguf-f16: timed only" in md and "within the F16 limits" in md
    assert "1 threads (eval.llama_cpp_threads)" in md and "threads = cores" not in md


def _check_gguf_fidelity(report: dict, rows: dict) -> None:
    """GGUF rows carry every fidelity set, scored and answered in llama.cpp; Q8_0 is as
    faithful as the float student it came from, answers included."""
    sets = ["teacher_text", "extra:notes.txt", "generation"]
    assert list(report["fidelity"]) == sets
    scored = report["fidelity"]["teacher_text"]["scored_tokens"]
    for name, row in rows.items():
        if name == "teacher-gguf-f16":
            assert "fidelity" not in row  # timed only
            continue
        assert list(row["fidelity"]) == sets, name
        assert row["fidelity"]["teacher_text"]["scored_tokens"] == scored
        assert math.isfinite(row["fidelity"]["generation"]["teacher_nll"])
    for s in ("teacher_text", "extra:notes.txt"):
        q8, student = rows["student-gguf-q8_0"]["fidelity"][s], rows["student"]["fidelity"][s]
        assert q8["kl_to_teacher"] == pytest.approx(student["kl_to_teacher"], rel=0.05)
    # Q8_0's answers in llama.cpp are the student's (its ratio is the float student's, and far
    # from the teacher's own 1: these untied models answer differently).
    q8_ratio = rows["student-gguf-q8_0"]["fidelity"]["generation"]["teacher_nll_ratio"]
    student_ratio = rows["student"]["fidelity"]["generation"]["teacher_nll_ratio"]
    # (Q8_0's rounding turns a few of its greedy tokens: close, not equal.)
    assert q8_ratio == pytest.approx(student_ratio, rel=0.2)
    assert student_ratio > 3 and q8_ratio > 3


def test_greedy_answers_in_llama_cpp_match_transformers(tmp_path: Path, bpe) -> None:
    from distill.quantize.gguf import reference_model
    from distill.sampling import generate, stop_ids

    # Untied: a tied random tiny model greedily repeats its last input token, any weights.
    model = tiny_llama(VOCAB, layers=2, seed=3, tie=False)
    path = export_gguf(model, bpe, tmp_path / "untied-f16.gguf", "f16").path
    reference = reference_model(model, export_gguf(model, bpe, tmp_path / "b.gguf", "f16"))
    prompts = [tuple(p.tolist()) for p in _blocks(4, 5, seed=9)] + [(4, 5)]
    stop = stop_ids(reference)
    want = generate(reference, prompts, max_new_tokens=8, temperature=0, seed=0, batch_size=1)
    with llama_cpp.open_gguf(path, n_ctx=16, threads=1) as rt:
        got = rt.generate(prompts, 8, stop, vocab_size=VOCAB)
        assert got == want
        assert len({a[:3] for a in got}) > 1  # not one degenerate answer for every prompt
        # A stop token ends the answer, included.
        first = got[0][2]
        assert rt.generate(prompts[:1], 8, [first])[0] == got[0][: got[0].index(first) + 1]
        with pytest.raises(ValueError, match="non-empty prompts"):
            rt.generate([()], 4, [])


def test_without_llama_cpp_gguf_rows_say_why_and_the_run_goes_on(
    gguf_run: tuple[Path, Path], tmp_path: Path, bpe, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir, cache = gguf_run
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    cfg = _cfg(cache, ["q8_0"])
    report = _evaluate(cfg, run_dir, bpe, _blocks(4))
    rows = {v["name"]: v for v in report["variants"]}
    assert list(rows) == ["teacher", "student", "student-gguf-q8_0", "teacher-gguf-f16"]
    for row in (rows["student-gguf-q8_0"], rows["teacher-gguf-f16"]):
        assert "pip install llama-cpp-python==0.3.36" in row["llama_cpp_error"]
        assert math.isnan(row["perplexity"]) and row["scored_tokens"] == 0
        assert row["decode_tokens_per_s"] is None
        assert row["deployed_decode_tokens_per_s"] is None and row["decode_bound_ratio"] is None
    row = rows["student-gguf-q8_0"]
    assert math.isnan(row["fidelity"]["teacher_text"]["kl_to_teacher"])
    assert math.isnan(row["fidelity"]["generation"]["teacher_nll_ratio"])
    assert row["weight_bytes"] == gguf_tensor_bytes(RunDir(run_dir).gguf_file("q8_0"))
    assert 8 < row["bits_per_weight"] < 10  # what the file stores, measured without llama.cpp
    on_disk = json.loads((run_dir / "report.json").read_text())
    assert on_disk["variants"][2]["llama_cpp_error"] == row["llama_cpp_error"]


def test_quantize_without_llama_cpp_exports_no_teacher_file(
    tmp_path: Path, bpe, monkeypatch: pytest.MonkeyPatch
) -> None:
    from distill.quantize.teacher_gguf import teacher_gguf_record

    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    record = teacher_gguf_record(Teacher.of(_teacher(), bpe), tmp_path, _blocks(2))
    assert record["dst"] is None and "pip install" in record["error"]
    assert not (tmp_path / "gguf").exists()  # nothing written for a row that cannot run
