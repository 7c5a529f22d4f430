"""scripts/bench/bench_quant.py's pieces on a tiny model: fast kernels compute the same logits."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from distill.quantize.folder import quantize_folder
from tests.conftest import REPO, tiny_llama

sys.path.insert(0, str(REPO / "scripts" / "bench"))
import bench_lib as bench  # noqa: E402  (a script folder, not a package)


def test_fast_cpu_kernels_match_torchao_and_restore(tmp_path: Path, tokenizer) -> None:
    src = tmp_path / "final"
    tiny_llama(len(tokenizer), layers=2).save_pretrained(str(src))
    tokenizer.save_pretrained(str(src))
    ids = torch.arange(24).reshape(2, 12) * 5 % len(tokenizer)
    for method in ("int8_weight_only", "int4_weight_only"):
        quantize_folder(src, tmp_path / method, method, include_embeddings=True)
        model = AutoModelForCausalLM.from_pretrained(tmp_path / method)
        with torch.inference_mode():
            plain = model(ids).logits
            with bench.fast_cpu_kernels():
                fast = model(ids).logits
            again = model(ids).logits
        # int8 linears run on bf16 activations: bf16-sized differences (logits here ~0.2).
        torch.testing.assert_close(fast, plain, atol=1e-2, rtol=0)
        assert torch.equal(again, plain)  # torchao's own kernels are back


def test_bench_table_and_rates(tmp_path: Path, tokenizer) -> None:
    src = tmp_path / "run" / "final"
    tiny_llama(len(tokenizer), layers=1).save_pretrained(str(src))
    tokenizer.save_pretrained(str(src))
    quantize_folder(
        src,
        tmp_path / "run" / "quantized" / "int8_weight_only",
        "int8_weight_only",
        include_embeddings=True,
    )
    variants = bench.load_variants(tmp_path / "run", ["int8_weight_only"], [])
    assert [v.name for v in variants] == [
        "student (fp32)",
        "student-int8_weight_only",
        "student-int8_weight_only+fast",
    ]
    prompt = bench.prompt_ids(tmp_path / "run", 8)
    times = bench.decode_times(variants, prompt, new_tokens=2, repeats=2)
    assert len(times.seconds["student (fp32)"]) == 2 * 2  # one fp32 run before each variant
    assert len(times.speedups["student-int8_weight_only"]) == 2
    lines = bench.table(variants, times, new_tokens=2)
    assert len(lines) == 4 and "speed x fp32" in lines[0]
    assert lines[1].split()[-3] == "1.00"  # fp32 against itself
    assert "threads" in bench.machine_line()


def test_deployed_table_puts_each_row_against_its_bound_and_q8_0() -> None:
    rows = [
        bench.DeployedRow("student", "torch.compile", 50.0, 4e8),
        # The same file dequantized and compiled in PyTorch is not the llama.cpp reference.
        bench.DeployedRow("student-gguf-q8_0", "torch.compile", 25.0, 4e8),
        bench.DeployedRow("student-gguf-q8_0", "llama.cpp 0.3.36", 100.0, 1e8),
        bench.DeployedRow("student-gguf-q4_0", "llama.cpp", None, 6e7, "not installed"),
    ]
    lines = bench.deployed_table(rows, bandwidth=4e10)
    student = lines[1].split()
    # bound 4e10 / 4e8 = 100 tok/s, so 50 tok/s is 50% of it and 0.50x the Q8_0 rate.
    assert student[-3:] == ["100.0", "50%", "0.50"]
    assert lines[2].split()[-1] == "0.25"
    q8 = lines[3].split()
    assert q8[-3:] == ["400.0", "25%", "1.00"]
    assert "failed: not installed" in lines[4]


def test_compiled_rates_leave_out_dequantized_gguf_and_fast_kernel_rows(monkeypatch) -> None:
    from distill.evaluate import compiled_decode

    compiled = []

    def fake_measure(model, prompt, new_tokens, repeats):
        compiled.append(model)
        return compiled_decode.CompiledDecode(10.0, 1.0, 0.0)

    monkeypatch.setattr(compiled_decode, "measure_compiled_decode", fake_measure)
    variants = [
        bench.Variant("student (fp32)", "fp32", 4),
        bench.Variant("student-int8_weight_only+fast", "int8", 1, fast_kernels=True),
        bench.Variant("student-gguf-q8_0", "dequantized", 1, dequantized_gguf=True),
    ]
    rows = bench.compiled_rates(variants, torch.zeros(1, 2, dtype=torch.long), 2, 1)
    assert compiled == ["fp32"] and [r.name for r in rows] == ["student (fp32)"]
