"""The quantize stage on microscopic llama and GPT-2 models saved to disk.

Every quantized folder is reloaded with plain ``AutoModelForCausalLM.from_pretrained``, as a
user would, and compared with the float model it came from.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from distill.config import (
    EvalConfig,
    PairConfig,
    PipelineConfig,
    QuantConfig,
    StudentConfig,
    TeacherConfig,
)
from distill.data import PackedSplits
from distill.errors import DistillError
from distill.models.footprint import tensor_bytes
from distill.quantize.folder import quantize_folder, quantize_to_folder
from distill.quantize.parity import ParityError
from distill.quantize.plan import plan_quantization
from distill.quantize.stage import run
from distill.quantize.torchao import QuantizeError

VOCAB = 300  # the conftest tokenizer: 256 byte symbols + <|endoftext|> + 43 merges
METHOD = "int8_weight_only"
# Symmetric per-row int8 moves each weight by at most max|row| / 254 (~0.4% of the row's
# range); through two layers this shifts these logits (std ~0.17) by ~7e-3 at most. 2e-2
# leaves room for other seeds while still failing on a wrong scale, axis or a float fallback.
LOGIT_ATOL = 2e-2


def _tiny_llama() -> nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    return AutoModelForCausalLM.from_config(cfg).eval()


def _tiny_gpt2() -> nn.Module:
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_layer=2,
        n_embd=64,
        n_head=4,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    return AutoModelForCausalLM.from_config(cfg).eval()


def _save(model: nn.Module, folder: Path, tokenizer) -> Path:
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def _logits(model: nn.Module) -> torch.Tensor:
    """(2, 16, V) logits on fixed token ids."""
    ids = torch.arange(32).reshape(2, 16) * 7 % VOCAB
    with torch.inference_mode():
        return model(ids).logits


@pytest.fixture(scope="module")
def llama_src(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:
    return _save(_tiny_llama(), tmp_path_factory.mktemp("llama") / "final", tokenizer)


@pytest.fixture(scope="module")
def llama_q(llama_src: Path) -> tuple[Path, dict]:
    dst = llama_src.parent / "quantized" / METHOD
    return dst, quantize_folder(llama_src, dst, METHOD, include_embeddings=True)


@pytest.fixture(scope="module")
def gpt2_src(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:
    return _save(_tiny_gpt2(), tmp_path_factory.mktemp("gpt2") / "final", tokenizer)


def test_llama_reload_matches_float_logits(llama_src: Path, llama_q: tuple[Path, dict]) -> None:
    dst, result = llama_q
    float_model = AutoModelForCausalLM.from_pretrained(llama_src)
    q = AutoModelForCausalLM.from_pretrained(dst)
    assert type(q.model.layers[0].mlp.down_proj.weight).__name__ == "Int8Tensor"
    assert type(q.model.embed_tokens.weight).__name__ == "Int8Tensor"
    torch.testing.assert_close(_logits(q), _logits(float_model), atol=LOGIT_ATOL, rtol=0)
    # Every Linear and the embedding: 7 per layer, plus the embedding and its tied head.
    assert len(result["quantized_modules"]) == 2 * 7 + 2
    assert result["skipped_modules"] == []
    assert result["quant_type"] == "Int8WeightOnlyConfig"


def test_llama_weight_bytes_about_a_quarter(llama_q: tuple[Path, dict]) -> None:
    _, result = llama_q
    # int8 values are 1/4 of fp32; per-row fp32 scales (4 bytes per 64-256 values) and the
    # float RMSNorm weights add ~2%. Two stored copies of the tied table would give > 0.35.
    assert 0.25 < result["weight_bytes_ratio"] <= 0.30
    assert result["weight_bytes"] == pytest.approx(0.27 * result["float_weight_bytes"], rel=0.03)
    assert result["disk_bytes"] <= 0.32 * result["float_disk_bytes"]


def test_tied_embedding_is_stored_once(llama_q: tuple[Path, dict]) -> None:
    dst, result = llama_q
    assert result["tied_embeddings"] is True
    assert result["tied_modules"] == {"lm_head": "model.embed_tokens"}
    with safe_open(str(dst / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert not [k for k in keys if k.startswith("lm_head")], keys
    assert "model.embed_tokens._weight_qdata" in keys
    q = AutoModelForCausalLM.from_pretrained(dst)
    assert q.lm_head.weight is q.model.embed_tokens.weight


def test_folder_is_complete_and_has_no_leftovers(
    llama_src: Path, llama_q: tuple[Path, dict]
) -> None:
    dst, _ = llama_q
    names = {f.name for f in dst.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= names
    qc = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "torchao"
    assert qc["include_input_output_embeddings"] is True
    assert [f.name for f in dst.parent.iterdir()] == [METHOD]  # no staging dir left behind


# (method, logit tolerance vs float, stored bits per weight range). int8: 8 bits + one fp32
# scale per 64-value row; CPU int4: Linear values unpacked in int8 + fp16 scale and fp16 zero
# point per 32-value group (8 + 32/32), the embedding (most of this tiny model) int8 with an
# fp16 scale and zero per 64-value row (8 + 32/64); casts: 16. RMSNorm weights add a little.
METHODS = [
    ("bf16", 3e-2, (16.0, 16.1)),
    ("fp16", 5e-3, (16.0, 16.1)),
    ("int8_weight_only", LOGIT_ATOL, (8.5, 8.7)),
    ("int8_dynamic", 5e-2, (8.5, 8.7)),
    ("int4_weight_only", 0.2, (8.9, 9.1)),
]


@pytest.mark.parametrize("method,atol,bits", METHODS, ids=[m[0] for m in METHODS])
def test_every_method_reloads_close_and_tied(
    llama_src: Path, tmp_path: Path, method: str, atol: float, bits: tuple[float, float]
) -> None:
    result = quantize_folder(llama_src, tmp_path / method, method, include_embeddings=True)
    q = AutoModelForCausalLM.from_pretrained(tmp_path / method)
    float_logits = _logits(AutoModelForCausalLM.from_pretrained(llama_src))
    torch.testing.assert_close(_logits(q).float(), float_logits, atol=atol, rtol=0)
    assert q.lm_head.weight is q.model.embed_tokens.weight
    assert result["tied_embeddings"] is True
    assert bits[0] <= result["bits_per_weight"] <= bits[1], result["bits_per_weight"]
    with safe_open(str(tmp_path / method / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if k.startswith("lm_head")]
    assert result["device"] == "cpu" and result["storage"]


def test_int4_groups_and_indivisible_rows(llama_src: Path, tmp_path: Path) -> None:
    result = quantize_folder(
        llama_src, tmp_path / "q", "int4_weight_only", include_embeddings=True, group_size=128
    )
    # Rows of 64 (hidden) are not whole groups of 128; rows of 128 (down_proj) are.
    skipped = {s["name"]: s["reason"] for s in result["skipped_modules"]}
    assert "model.layers.0.self_attn.q_proj" in skipped
    assert "quant.group_size=128" in skipped["model.layers.0.self_attn.q_proj"]
    assert "model.layers.0.mlp.down_proj" in result["quantized_modules"]
    q = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert type(q.model.layers[0].mlp.down_proj.weight).__name__ == "IntxUnpackedToInt8Tensor"
    assert type(q.model.layers[0].self_attn.q_proj.weight) is nn.Parameter
    assert result["group_size"] == 128


def test_embeddings_kept_in_float_are_reported(llama_src: Path, tmp_path: Path) -> None:
    result = quantize_folder(llama_src, tmp_path / "q", METHOD, include_embeddings=False)
    skipped = {s["name"]: s for s in result["skipped_modules"]}
    assert set(skipped) == {"model.embed_tokens", "lm_head"}
    assert "include_embeddings" in skipped["model.embed_tokens"]["reason"]
    assert "tied to model.embed_tokens" in skipped["lm_head"]["reason"]
    assert result["tied_embeddings"] is True
    q = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert type(q.model.embed_tokens.weight) is nn.Parameter
    assert q.model.embed_tokens.weight.dtype == torch.float32
    # Only the 14 Linear weights shrank: the float embedding is most of this tiny model.
    assert 0.35 < result["weight_bytes_ratio"] < 0.45


def _block_matrix_bytes(model: nn.Module, blocks: nn.Module) -> int:
    """Bytes of the 2-D weights inside the transformer blocks (attention and MLP)."""
    return sum(
        tensor_bytes(m.weight)
        for m in blocks.modules()
        if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 2
    )


@pytest.mark.parametrize("method", ["int8_weight_only", "int4_weight_only"])
def test_gpt2_conv1d_quantizes_like_llama(
    gpt2_src: Path, llama_src: Path, tmp_path: Path, method: str
) -> None:
    """GPT-2's Conv1D is quantized (as Linear), with llama's byte reduction, and reloads."""
    from distill.models.conv1d import CONFIG_KEY, load_causal_lm
    from distill.quantize.parity import Artifact, reload_logits

    g = quantize_folder(gpt2_src, tmp_path / "g", method, include_embeddings=True)
    ll = quantize_folder(llama_src, tmp_path / "l", method, include_embeddings=True)
    convs = [f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "attn.c_proj")]
    convs += [f"transformer.h.{i}.{m}" for i in range(2) for m in ("mlp.c_fc", "mlp.c_proj")]
    assert set(convs) <= set(g["quantized_modules"])
    assert {s["name"] for s in g["skipped_modules"]} == {"transformer.wpe"}  # positions only
    assert g["loader"] == "distill.models.conv1d.load_causal_lm"
    assert ll["loader"] == "transformers.AutoModelForCausalLM.from_pretrained"
    assert sorted(json.loads((tmp_path / "g" / "config.json").read_text())[CONFIG_KEY]) == sorted(
        convs
    )

    ratios = {}
    for name, src, dst, blocks in (
        ("gpt2", gpt2_src, tmp_path / "g", lambda m: m.transformer.h),
        ("llama", llama_src, tmp_path / "l", lambda m: m.model.layers),
    ):
        float_model = AutoModelForCausalLM.from_pretrained(src)
        q = load_causal_lm(dst)
        ratios[name] = _block_matrix_bytes(q, blocks(q)) / _block_matrix_bytes(
            float_model, blocks(float_model)
        )
    # Same bytes per block weight: ~1/4 for int8 (a scale per row), ~0.27 for unpacked int4.
    assert ratios["gpt2"] == pytest.approx(ratios["llama"], abs=0.01), ratios
    assert ratios["gpt2"] < 0.3

    float_model = AutoModelForCausalLM.from_pretrained(gpt2_src)
    q = load_causal_lm(tmp_path / "g")
    assert isinstance(q.transformer.h[0].attn.c_attn, nn.Linear)
    assert q.lm_head.weight is q.transformer.wte.weight
    atol = LOGIT_ATOL if method == METHOD else 0.2
    torch.testing.assert_close(_logits(q), _logits(float_model), atol=atol, rtol=0)
    # The parity check's fresh process reloads it to the same logits as this process.
    ids = torch.arange(32).reshape(2, 16) * 7 % VOCAB
    fresh = reload_logits([Artifact("g", tmp_path / "g")], ids, tmp_path / "parity")["g"]
    torch.testing.assert_close(fresh["logits"], _logits(q), atol=1e-5, rtol=0)
    # Plain from_pretrained cannot place the stored Linear weights in Conv1D: it says so.
    with pytest.raises(RuntimeError, match="mismatch"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "g")


@pytest.mark.parametrize("build", [_tiny_llama, _tiny_gpt2], ids=["llama", "gpt2"])
def test_plan_accounts_for_every_2d_weight(build) -> None:
    model = build()
    for include in (True, False):
        plan = plan_quantization(model, include_embeddings=include)
        accounted = plan.quantize + [s["name"] for s in plan.skipped]
        accounted += [a for a, o in plan.aliases.items() if o in plan.quantize]
        with_weight = [
            n
            for n, m in model.named_modules()
            if getattr(m, "weight", None) is not None and m.weight.dim() == 2
        ]
        assert sorted(accounted) == sorted(with_weight)
        assert len(set(accounted)) == len(accounted)


def _cfg(methods: list[str], gguf: list[str]) -> PipelineConfig:
    return PipelineConfig(
        pair=PairConfig(
            name="tiny",
            teacher=TeacherConfig(name_or_path="unused"),
            student=StudentConfig(num_layers=1),
        ),
        quant=QuantConfig(methods=methods, include_embeddings=True, gguf=gguf),
        eval=EvalConfig(teacher_gguf=False),  # the teacher's file: tests/evaluate/test_llama_cpp
    )


VAL = torch.arange(64).reshape(4, 16) * 5 % VOCAB
CALIB = torch.arange(128).reshape(8, 16) * 7 % VOCAB
SPLITS = PackedSplits(train=CALIB, val=VAL)


def test_run_writes_every_artifact_with_parity(llama_src: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(llama_src, run_dir / "final")
    run(_cfg([METHOD, "int4_weight_only"], ["q8_0", "q4_0"]), run_dir, splits=SPLITS)
    # Another config replaces the first run's quantized/ whole: nothing it no longer asks for
    # is left behind.
    results = run(_cfg([METHOD], ["q4_0"]), run_dir, splits=SPLITS)
    summary = json.loads((run_dir / "quantized" / "quantize.json").read_text())
    assert summary == json.loads(json.dumps(results))
    assert [r["method"] for r in summary] == [METHOD, "gguf-q4_0"]
    assert [r["dst"] for r in summary] == [METHOD, "gguf/student-q4_0.gguf"]  # in quantized/
    out = run_dir / "quantized"
    assert sorted(f.name for f in out.iterdir()) == [
        "COMPLETE",
        "gguf",
        METHOD,
        "parity_blocks.safetensors",
        "quantize.json",
    ]
    assert [f.name for f in (out / "gguf").iterdir()] == ["student-q4_0.gguf"]
    assert sorted(p.name for p in run_dir.iterdir()) == ["final", "quantized"]  # no leftovers
    # The same config again: the stage sees its stamp and writes nothing.
    stamp = (out / "quantize.json").stat().st_mtime_ns
    assert run(_cfg([METHOD], ["q4_0"]), run_dir, splits=SPLITS) == results
    assert (out / "quantize.json").stat().st_mtime_ns == stamp
    for r in summary:
        par = r["parity"]
        assert par["passed"] is True, par
        assert par["scored_positions"] == 2 * 15  # PARITY_BLOCKS blocks, T - 1 positions
        if r["format"] == "gguf":
            # Run by llama.cpp, which quantizes activations inside its Q4_0 dot products.
            assert par["checked_in"].startswith("llama.cpp "), par
            assert par["max_abs_logit_diff"] <= 1e-2
            assert par["ppl_reloaded"] == pytest.approx(par["ppl_in_memory"], rel=1e-3)
            continue
        # Reloaded in a fresh process, the artifact computes what the in-memory model did.
        assert par["max_abs_logit_diff"] <= 1e-4
        assert par["ppl_reloaded"] == pytest.approx(par["ppl_in_memory"], rel=1e-5)
        assert 0 < r["bits_per_weight"] < 32
    assert summary[1]["parity"]["tokenizer_ids_match"] is True
    # Every Linear of the q4_0 file came from GPTQ (2 layers x 7); the embedding is Q8_0.
    assert summary[1]["calibrated_tensors"] == 2 * 7
    assert summary[1]["tensor_types"]["q8_0"] == 1
    assert summary[1]["weight_bytes"] < 0.2 * summary[1]["float_weight_bytes"]


def test_parity_failure_names_the_artifact(
    llama_src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from distill.quantize import parity

    monkeypatch.setitem(parity.MAX_KL_TO_FLOAT, "int4_weight_only", 0.0)
    run_dir = tmp_path / "run"
    shutil.copytree(llama_src, run_dir / "final")
    with pytest.raises(ParityError, match="/int4_weight_only: KL to the float") as err:
        run(_cfg([METHOD, "int4_weight_only"], []), run_dir, splits=SPLITS)
    assert isinstance(err.value, DistillError)
    assert f"/{METHOD}:" not in str(err.value)
    # Nothing failed is published as quantized/; the figures wait in the staging folder the
    # message names, so the failure can be inspected.
    assert not (run_dir / "quantized").exists()
    (staging,) = run_dir.glob(".staging-quantized-*")
    assert str(staging) in str(err.value)
    summary = json.loads((staging / "quantize.json").read_text())
    assert [r["parity"]["passed"] for r in summary] == [True, False]
    assert not list(staging.glob(".parity*"))


def test_run_without_final_names_the_fix(tmp_path: Path) -> None:
    cfg = PipelineConfig(
        pair=PairConfig(
            name="tiny",
            teacher=TeacherConfig(name_or_path="unused"),
            student=StudentConfig(num_layers=1),
        ),
    )
    with pytest.raises(QuantizeError, match="scripts/distill.py") as err:
        run(cfg, tmp_path)
    assert isinstance(err.value, DistillError)


def test_unknown_method_is_a_user_error(llama_src: Path, tmp_path: Path) -> None:
    with pytest.raises(QuantizeError, match="int8_weight_only"):
        quantize_folder(llama_src, tmp_path / "q", "int3", include_embeddings=True)
    assert not (tmp_path / "q").exists()


def test_fresh_process_reloads_without_distill(llama_src: Path, llama_q: tuple[Path, dict]) -> None:
    dst, _ = llama_q
    expected = _logits(AutoModelForCausalLM.from_pretrained(llama_src))
    code = textwrap.dedent(
        f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(dst)!r})
        assert not any(k == "distill" or k.startswith("distill.") for k in sys.modules)
        assert m.lm_head.weight is m.model.embed_tokens.weight
        ids = torch.arange(32).reshape(2, 16) * 7 % {VOCAB}
        with torch.inference_mode():
            torch.save(m(ids).logits, sys.argv[1])
            out = m.generate(ids[:1, :4], max_new_tokens=3, do_sample=False)
        assert out.shape == (1, 7), out.shape
        """
    )
    out_file = dst.parent.parent / "fresh_logits.pt"
    proc = subprocess.run(
        [sys.executable, "-c", code, str(out_file)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=dst.parent.parent,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(out_file, weights_only=True)
    torch.testing.assert_close(got, expected, atol=LOGIT_ATOL, rtol=0)


def test_quant_config_names_every_bad_field() -> None:
    bad = QuantConfig(methods=["int3", "int8_weight_only"], group_size=48, gguf=["q4_k", "q8_0"])
    problems = " ".join(bad.problems())
    assert "int3" in problems and "quant.group_size=48" in problems and "q4_k" in problems
    assert "int8_dynamic" in problems  # the message lists the allowed methods
    assert QuantConfig().problems() == []
    assert QuantConfig().gguf == ["q8_0", "q4_0"]
    bad = QuantConfig(calibration="awq", calibration_blocks=0, embedding_bits=6).problems()
    assert len(bad) == 3 and "choose one of gptq, none" in bad[0] and "4 or 8" in bad[2]


def test_evaluate_loads_int4_at_its_stored_size(llama_src: Path, tmp_path: Path) -> None:
    # torchao's unpacked int4 tensor widens its fp16 scales on any .to(): the evaluate stage
    # must not move a model that is already where it should be.
    from distill.evaluate.rows import load_variant
    from distill.models import weight_bytes

    result = quantize_folder(llama_src, tmp_path / "q", "int4_weight_only", include_embeddings=True)
    model = load_variant(tmp_path / "q", torch.device("cpu"))
    assert weight_bytes(model) == result["weight_bytes"]


def test_bf16_compute_dtype_reloads_in_bf16(llama_src: Path, tmp_path: Path) -> None:
    """quant.compute_dtype=bfloat16: int8 weights, bf16 activations, after a reload too."""
    result, in_memory = quantize_to_folder(
        llama_src, tmp_path / "q", METHOD, include_embeddings=True, compute_dtype="bfloat16"
    )
    assert result["compute_dtype"] == "bfloat16"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert reloaded.dtype == torch.bfloat16
    assert type(reloaded.model.layers[0].mlp.up_proj.weight).__name__ == "Int8Tensor"
    assert torch.equal(_logits(reloaded), _logits(in_memory))
    float_logits = _logits(AutoModelForCausalLM.from_pretrained(llama_src))
    torch.testing.assert_close(_logits(reloaded).float(), float_logits, atol=0.1, rtol=0)
    assert 0.2 < result["weight_bytes_ratio"] < 0.3


def test_fresh_process_reload_takes_relative_paths(
    llama_q: tuple[Path, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """run_dir=outputs/<run> is relative; the child runs in its work folder, so reload_logits
    must hand it absolute paths, and it computes block by block, as the in-memory reference."""
    from distill.models.conv1d import load_causal_lm
    from distill.quantize.parity import Artifact, reload_logits

    folder, _ = llama_q
    monkeypatch.chdir(tmp_path)  # not the shared fixture's folder: the work folder lands here
    ids = torch.arange(32).reshape(2, 16) * 7 % VOCAB
    relative = Path(os.path.relpath(folder, tmp_path))
    fresh = reload_logits([Artifact("q", relative)], ids, Path("parity"))["q"]
    q = load_causal_lm(folder)
    with torch.inference_mode():
        rows = [q(ids[i : i + 1]).logits for i in range(2)]
    torch.testing.assert_close(fresh["logits"], torch.cat(rows), atol=0, rtol=0)


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_gemma_int8_folder_reloads_with_its_embedding_scale(tmp_path: Path, arch: str) -> None:
    # Gemma's scaled embedding keeps sqrt(hidden) in an unsaved buffer that transformers'
    # torchao reload leaves uninitialized once the embedding is quantized: the embedding stays
    # in float, says why, and the folder passes the fresh-process parity check.
    from tests.conftest import make_tokenizer
    from tests.models.test_width import VOCAB as GEMMA_VOCAB
    from tests.models.test_width import tiny_gemma3
    from tests.quantize.gguf_models import arch_model

    run_dir = tmp_path / "run"
    model = tiny_gemma3() if arch == "gemma3" else arch_model(arch, GEMMA_VOCAB, layers=4)
    model.save_pretrained(str(run_dir / "final"))
    make_tokenizer(GEMMA_VOCAB).save_pretrained(str(run_dir / "final"))
    ids = torch.arange(64).reshape(4, 16) * 5 % GEMMA_VOCAB
    (record,) = run(
        _cfg(["int8_weight_only"], []), run_dir, splits=PackedSplits(train=ids, val=ids)
    )
    assert record["parity"]["passed"] is True, record["parity"]
    skipped = {s["name"]: s["reason"] for s in record["skipped_modules"]}
    assert "unsaved buffer (embed_scale)" in skipped["model.embed_tokens"]
    reloaded = AutoModelForCausalLM.from_pretrained(run_dir / "quantized" / "int8_weight_only")
    assert float(reloaded.model.embed_tokens.embed_scale) == pytest.approx(64**0.5)
