"""Compiled decode: the greedy loop is right, compiled logits are checked, failures are rows."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama

from distill.config import EvalConfig
from distill.evaluate import compiled_decode
from distill.evaluate.compiled_decode import (
    CompiledDecodeError,
    compiled_decode_fields,
    greedy_static,
    measure_compiled_decode,
)
from distill.evaluate.memory import add_memory_fields
from distill.evaluate.report import format_memory_table

VOCAB = 96


@pytest.fixture(scope="module")
def model():
    return tiny_llama(VOCAB, layers=2)


def prompt(batch: int = 1, length: int = 6) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(5))


def test_static_greedy_loop_equals_generate(model) -> None:
    """Positions and cache handling of our loop give exactly transformers' greedy tokens."""
    from transformers import GenerationConfig, StaticCache

    ids = prompt(batch=2)
    with torch.no_grad():
        cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + 5)
        tokens, logits, seconds = greedy_static(model, model, ids, 5, cache)
        ref = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            generation_config=GenerationConfig(
                max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0
            ),
        )
    assert torch.equal(tokens, ref[:, ids.shape[1] :])
    assert logits.shape == (2, 5, VOCAB) and seconds > 0


def test_torchao_int8_model_compiles_and_matches_eager() -> None:
    """The int8 weight-only path experiment=compiled compiles (bf16 compute, torchao tensors
    with inductor freezing), on a tiny model: inductor really compiles it (no stand-in)."""
    from distill.quantize.plan import quantize_model

    int8 = tiny_llama(VOCAB, layers=2).to(torch.bfloat16)
    plan, _ = quantize_model(int8, "int8_weight_only", include_embeddings=True)
    assert plan.quantize  # torchao tensors, not a float model under another name
    assert type(int8.model.layers[0].mlp.up_proj.weight).__module__.startswith("torchao")
    # One graph serves the forced replay and the timed runs: a recompile (once caused by the
    # forced tokens' strides) would land inside a timed run and wreck its rate.
    with torch.inference_mode(), torch._dynamo.config.patch(error_on_recompile=True):
        # Raises when the compiled logits are off the eager ones by more than bf16's margin.
        result = measure_compiled_decode(int8, prompt(), new_tokens=4, repeats=1)
    assert result.tokens_per_s > 0 and result.compile_s > 0
    assert result.max_abs_logit_diff <= 3e-2 * 20  # bf16's margin of logits of this size
    # The method says what ran: the decode attention switched in, guard checks skipped.
    assert result.method.startswith(compiled_decode.BASE_METHOD)
    assert "eager attention" in result.method and "guard checks skipped" in result.method


def _fake_compile(shift: float):
    def fake(model, **kwargs):
        def step(**inputs):
            out = model(**inputs)
            out.logits = out.logits + shift
            return out

        return step

    return fake


def test_compiled_logits_that_differ_are_refused(model, monkeypatch) -> None:
    monkeypatch.setattr(torch, "compile", _fake_compile(0.5))
    with torch.no_grad(), pytest.raises(CompiledDecodeError, match="differ from eager by 0.5"):
        measure_compiled_decode(model, prompt(), new_tokens=3, repeats=1)


def test_compiled_decode_runs_its_attention_and_restores_the_models(model, monkeypatch) -> None:
    seen = []

    def record(m, **kwargs):
        seen.append(m.config._attn_implementation)
        return m

    model.set_attn_implementation("sdpa")
    monkeypatch.setattr(torch, "compile", record)
    with torch.no_grad():
        measure_compiled_decode(model, prompt(), new_tokens=3, repeats=1)
    assert seen == [compiled_decode.DECODE_ATTENTION] and compiled_decode.DECODE_ATTENTION != "sdpa"
    assert model.config._attn_implementation == "sdpa"
    # Restored when the check refuses the compiled logits, too.
    monkeypatch.setattr(torch, "compile", _fake_compile(0.5))
    with torch.no_grad(), pytest.raises(CompiledDecodeError):
        measure_compiled_decode(model, prompt(), new_tokens=3, repeats=1)
    assert model.config._attn_implementation == "sdpa"


def test_report_fields_carry_rate_ratio_or_error(model, monkeypatch) -> None:
    cfg = EvalConfig(decode_tokens=3, repeats=1, compiled_decode=["student-*"])
    assert compiled_decode_fields("teacher", model, prompt(), cfg) == {}

    def broken(model, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", broken)
    failed = compiled_decode_fields("student-int8", model, prompt(), cfg)
    assert failed["decode_compiled_tokens_per_s"] is None
    assert "no C++ compiler" in failed["decode_compiled_error"]

    monkeypatch.setattr(torch, "compile", _fake_compile(0.0))  # eager stand-in: fast
    ok = compiled_decode_fields("student-int8", model, prompt(), cfg)
    assert ok["decode_compiled_error"] is None and ok["decode_compiled_tokens_per_s"] > 0
    assert ok["decode_compiled_method"].startswith(compiled_decode.BASE_METHOD)

    row = {
        "weight_bytes": 1000,
        "loaded_weight_bytes": 1000,
        "kv_cache_bytes_per_token": 10,
        "prompt_tokens": 6,
        "decode_tokens": 3,
        "decode_tokens_per_s": 5.0,
        **ok,
    }
    add_memory_fields(row, cfg, bandwidth_bytes_per_s=1e6)
    assert row["decode_compiled_bound_ratio"] == pytest.approx(
        ok["decode_compiled_tokens_per_s"] / row["decode_bound_tokens_per_s"]
    )
    failed_row = {**row, **failed, "name": "student-int4"}
    table = format_memory_table({"variants": [{**row, "name": "student-int8"}, failed_row]})
    # The compiled rate is the row's deployed speed; a failed compile has none (its eager
    # rate, 5.0 here, is a diagnostic and never stands in for it).
    assert "| student-int8 | torch.compile |" in table
    assert f"{row['decode_compiled_bound_ratio'] * 100:.0f}% |" in table
    int4 = next(line for line in table.splitlines() if "| student-int4 |" in line)
    assert "| student-int4 | PyTorch |" in int4 and "5.0" not in int4


def test_method_text_names_only_the_steps_that_ran(model, monkeypatch) -> None:
    """A model already on the decode attention is not switched; a torch without
    skip_guard_eval_unsafe pays the guard checks: the method says so in both cases."""
    monkeypatch.setattr(torch, "compile", _fake_compile(0.0))
    model.set_attn_implementation(compiled_decode.DECODE_ATTENTION)
    monkeypatch.setattr(torch.compiler, "set_stance", lambda *a, **k: None)  # no such option
    with torch.no_grad():
        result = measure_compiled_decode(model, prompt(), new_tokens=3, repeats=1)
    assert "switched" not in result.method and "guard checks skipped" not in result.method
    assert "guard checks run" in result.method


def test_config_rejects_single_token_compiled_decode() -> None:
    problems = EvalConfig(decode_tokens=1, compiled_decode=["student"]).problems()
    assert any("eval.compiled_decode needs >= 2" in p for p in problems)
