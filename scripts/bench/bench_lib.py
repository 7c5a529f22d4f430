"""Decode speed of every saved variant against the fp32 student, side by side in one process.

All variants are loaded once, then timed in rounds; in each round every variant runs right
after an fp32 run, so the two see the same load from a neighbour on a shared CPU, and the
speed-up is the median of those back-to-back ratios (tokens/s is the median of the runs). A
decode run is greedy ``generate`` of ``new_tokens`` tokens after a ``prompt_tokens`` prompt at
batch size 1, the whole call timed, ``min_new_tokens = max_new_tokens`` so an early EOS
cannot flatter a variant.

``profile_decode`` records one decode run under ``torch.profiler`` and returns the operators
that took the most CPU time: where a quantized variant spends what it does not save.

What the profile shows for torchao 0.18 on CPU, and :func:`fast_cpu_kernels` changes:

* ``Int8Tensor`` and ``IntxUnpackedToInt8Tensor`` run ``embedding`` by dequantizing the
  *whole* table and then gathering rows: every decode step converts all 49152 x 576
  embedding values to float to read one row;
* ``Int8Tensor``'s weight-only ``linear`` computes ``x @ qdata.t().to(float) * scale``: each
  call converts the full int8 weight to a new float tensor (for a tied LM head, the whole
  table again), so it moves more memory than the fp32 matmul it replaces.

:func:`fast_cpu_kernels` swaps, inside a ``with`` block of this process only, those entries of
torchao's dispatch tables for a row gather before dequantizing and for
``torch._weight_int8pack_mm`` on bf16 activations (int8 weights read as int8; the activation
rounding to bf16 moves the logits about as much as a bf16 model's). Plain ``from_pretrained``
users get torchao's own kernels, which is what the evaluate stage measures.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from distill.models import param_count, weight_bytes


@dataclass
class Variant:
    name: str
    model: Any
    # Stored bytes (for GGUF the file's tensor data, not the dequantized copy in memory).
    stored_bytes: int
    note: str = ""
    # Run under fast_cpu_kernels().
    fast_kernels: bool = False
    # A GGUF file dequantized to fp32 by transformers: an fp32 model, not how the file deploys.
    dequantized_gguf: bool = False


def _int8_embedding(weight: Any, indices: torch.Tensor) -> torch.Tensor:
    rows = weight.qdata[indices].to(weight.dtype)
    return rows * weight.scale.reshape(weight.qdata.shape[0], -1)[indices].to(weight.dtype)


def _intx_embedding(weight: Any, indices: torch.Tensor) -> torch.Tensor:
    group = weight.block_size[-1]
    q = weight.qdata[indices].to(torch.float32)
    q = q.reshape(*q.shape[:-1], -1, group)
    zero = weight.zero_point[indices].to(torch.float32).unsqueeze(-1)
    scale = weight.scale[indices].to(torch.float32).unsqueeze(-1)
    return ((q - zero) * scale).flatten(-2).to(weight.dtype)


# torch's CPU int8pack kernel crashes (SIGSEGV) on int8 weights that are not 64-byte
# aligned, which safetensors' memory-mapped tensors often are: those are copied once and kept
# here (with the original, so its id stays unique) for the life of the process.
_ALIGNED: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


@contextmanager
def fast_cpu_kernels() -> Iterator[None]:
    """Row-gather embeddings and ``_weight_int8pack_mm`` linears for torchao CPU tensors.

    Changes torchao's dispatch tables for the duration of the block (this process only)
    and restores them after. Linears with activation quantization, per-group int8 weights
    or non-CPU inputs keep torchao's kernel.
    """
    from torchao.quantization import Int8Tensor, IntxUnpackedToInt8Tensor

    aten = torch.ops.aten
    old_linear = Int8Tensor._TORCH_FN_TABLE[Int8Tensor][F.linear]

    def aligned_qdata(w: Any) -> torch.Tensor:
        q = w.qdata
        if q.data_ptr() % 64 == 0 and q.is_contiguous():
            return q
        if id(q) not in _ALIGNED:  # once per weight, not per timed run
            _ALIGNED[id(q)] = (q, q.contiguous().clone())
        return _ALIGNED[id(q)][1]

    def int8_linear(func: Any, types: Any, args: Any, kwargs: Any) -> torch.Tensor:
        x, w = args[0], args[1]
        bias = args[2] if len(args) > 2 else None
        if (
            w.act_quant_kwargs is not None
            or w.act_pre_scale is not None
            or x.device.type != "cpu"
            or w.block_size[-1] != w.qdata.shape[-1]
        ):
            return old_linear(func, types, args, kwargs)
        # bf16 activations: torch's CPU int8pack kernel is vectorized for them (AVX512-BF16
        # here) and ~6x slower on fp32 ones, measured on the LM head and layer shapes.
        y = torch._weight_int8pack_mm(
            x.reshape(-1, x.shape[-1]).to(torch.bfloat16),
            aligned_qdata(w),
            w.scale.reshape(-1).to(torch.bfloat16),
        ).reshape(*x.shape[:-1], w.qdata.shape[0])
        y = y.to(x.dtype)
        return y if bias is None else y + bias

    swaps = [
        (Int8Tensor._TORCH_FN_TABLE[Int8Tensor], F.linear, int8_linear),
        (Int8Tensor._ATEN_OP_TABLE[Int8Tensor], aten.linear.default, int8_linear),
        (
            Int8Tensor._ATEN_OP_TABLE[Int8Tensor],
            aten.embedding.default,
            lambda f, t, args, kw: _int8_embedding(args[0], args[1]),
        ),
        (
            IntxUnpackedToInt8Tensor._TORCH_FN_TABLE[IntxUnpackedToInt8Tensor],
            F.embedding,
            lambda f, t, args, kw: _intx_embedding(args[1], args[0]),
        ),
        (
            IntxUnpackedToInt8Tensor._ATEN_OP_TABLE[IntxUnpackedToInt8Tensor],
            aten.embedding.default,
            lambda f, t, args, kw: _intx_embedding(args[0], args[1]),
        ),
    ]
    saved = [(table, key, table.get(key)) for table, key, _ in swaps]
    try:
        for table, key, fn in swaps:
            table[key] = fn
        yield
    finally:
        for table, key, fn in saved:
            if fn is None:
                table.pop(key, None)
            else:
                table[key] = fn


def load_variants(run_dir: Path, methods: list[str], gguf_types: list[str]) -> list[Variant]:
    """The fp32 student of ``run_dir/final`` first, then every quantized variant found.

    The variants are :func:`distill.run_dir.variants`' (``student_init`` left out); a
    missing quantized variant is skipped.
    """
    from transformers import AutoModelForCausalLM

    from distill.models import load_causal_lm
    from distill.quantize.gguf import gguf_tensor_bytes
    from distill.run_dir import RunDir, variants

    final = RunDir(run_dir).final
    student = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    out = [Variant("student (fp32)", student, weight_bytes(student))]
    present, _missing = variants(run_dir, methods, gguf_types)
    for v in present:
        if v.record_key is None:  # student_init and the fp32 student loaded above
            continue
        if v.is_gguf:
            model = AutoModelForCausalLM.from_pretrained(v.path.parent, gguf_file=v.path.name)
            note = "dequantized to fp32 by transformers: speed is fp32's"
            out.append(
                Variant(
                    v.name, model.eval(), gguf_tensor_bytes(v.path), note, dequantized_gguf=True
                )
            )
            continue
        model = load_causal_lm(v.path).eval()
        out.append(Variant(v.name, model, weight_bytes(model)))
        if v.precision == "int8_weight_only":
            # int4 gains nothing from it: its time goes into dequantizing every linear's
            # whole weight on every call, which no CPU kernel in torch replaces.
            out.append(
                Variant(
                    f"{v.name}+fast",
                    model,
                    weight_bytes(model),
                    "fast_cpu_kernels(): row-gather embedding, _weight_int8pack_mm",
                    fast_kernels=True,
                )
            )
    return out


def _generate_fn(model: Any, prompt: torch.Tensor, new_tokens: int) -> Any:
    from distill.evaluate.speed import greedy_generation_config

    gen_cfg = greedy_generation_config(model, new_tokens)
    mask = torch.ones_like(prompt)

    def run() -> None:
        with torch.inference_mode():
            model.generate(input_ids=prompt, attention_mask=mask, generation_config=gen_cfg)

    return run


@dataclass
class DecodeTimes:
    """Seconds per decode run of each variant, and each variant's speed-ups over fp32 measured
    in adjacent pairs (fp32 run, then the variant's run)."""

    seconds: dict[str, list[float]]
    speedups: dict[str, list[float]]

    def rate(self, name: str, new_tokens: int) -> float:
        return new_tokens / statistics.median(self.seconds[name])

    def speedup(self, name: str) -> float:
        return statistics.median(self.speedups[name])


def decode_times(
    variants: list[Variant], prompt: torch.Tensor, new_tokens: int, repeats: int
) -> DecodeTimes:
    """Time ``repeats`` rounds; in each, every variant runs right after an fp32 run.

    On a CPU shared with other jobs the load changes within seconds; a ratio of two runs made
    back to back sees the same load, where two medians taken minutes apart need not. The
    speed-up is the median of those paired ratios; tokens/s is the median of the runs.

    Args:
        prompt: ``(1, P)`` token ids; ``variants[0]`` is the fp32 baseline.
    """
    fns = {v.name: _generate_fn(v.model, prompt, new_tokens) for v in variants}
    fast = {v.name: v.fast_kernels for v in variants}

    def timed(name: str) -> float:
        with fast_cpu_kernels() if fast[name] else nullcontext():
            t0 = time.perf_counter()
            fns[name]()
            return time.perf_counter() - t0

    for name in fns:  # warm-up: first-call allocations, lazy kernel selection
        timed(name)
    base = variants[0].name
    out = DecodeTimes({name: [] for name in fns}, {name: [] for name in fns})
    for _ in range(repeats):
        for name in fns:
            if name == base:
                continue
            t_base, t_variant = timed(base), timed(name)
            out.seconds[base].append(t_base)
            out.seconds[name].append(t_variant)
            out.speedups[name].append(t_base / t_variant)
    out.speedups[base] = [1.0]
    return out


def machine_line() -> str:
    """Threads torch uses, cores, and the 1-minute load (how shared the CPU was)."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"torch threads {torch.get_num_threads()}, {os.cpu_count()} cores, "
        f"load average {load:.2f} (above the thread count means the CPU was shared)"
    )


def table(variants: list[Variant], times: DecodeTimes, new_tokens: int) -> list[str]:
    """One line per variant: tok/s, paired speed-up and bytes relative to fp32 (first)."""
    base = variants[0]
    lines = [
        f"{'variant':<30} {'decode tok/s':>12} {'speed x fp32':>12} {'bytes x fp32':>12} "
        f"{'bits/weight':>11}"
    ]
    for v in variants:
        bits = v.stored_bytes * 8 / param_count(v.model)
        lines.append(
            f"{v.name:<30} {times.rate(v.name, new_tokens):>12.1f} {times.speedup(v.name):>12.2f} "
            f"{v.stored_bytes / base.stored_bytes:>12.3f} {bits:>11.2f}"
            + (f"  ({v.note})" if v.note else "")
        )
    return lines


@dataclass
class CompiledRow:
    name: str
    tokens_per_s: float | None
    compile_s: float | None
    error: str | None


def compiled_rates(
    variants: list[Variant], prompt: torch.Tensor, new_tokens: int, repeats: int
) -> list[CompiledRow]:
    """Each variant's decode compiled (:mod:`distill.evaluate.compiled_decode`), one after another.

    Variants run under :func:`fast_cpu_kernels` are left out (their swapped dispatch is an
    eager-mode device), and so are dequantized GGUF files: compiled they are the fp32 student
    again, and llama.cpp is their runtime (:func:`llama_cpp_rows`). Not paired like
    :func:`decode_times`: each compiled model's packed weights are freed before the next
    compiles, so run this on a quiet machine.
    """
    from distill.evaluate.compiled_decode import CompiledDecodeError, measure_compiled_decode

    rows = []
    for v in variants:
        if v.fast_kernels or v.dequantized_gguf:
            continue
        try:
            with torch.inference_mode():
                r = measure_compiled_decode(v.model, prompt, new_tokens, repeats)
            rows.append(CompiledRow(v.name, r.tokens_per_s, r.compile_s, None))
        except CompiledDecodeError as err:
            rows.append(CompiledRow(v.name, None, None, str(err)))
    return rows


def compiled_table(
    variants: list[Variant], rows: list[CompiledRow], times: DecodeTimes, new_tokens: int
) -> list[str]:
    """Compiled tok/s against the compiled fp32 student (first row) and the eager one."""
    base = rows[0].tokens_per_s if rows and rows[0].tokens_per_s else float("nan")
    eager_base = times.rate(variants[0].name, new_tokens)
    stored = {v.name: v.stored_bytes for v in variants}
    lines = [
        f"{'variant (compiled)':<30} {'decode tok/s':>12} {'x fp32 comp':>11} "
        f"{'x fp32 eager':>12} {'bytes x fp32':>12} {'compile s':>9}"
    ]
    for r in rows:
        if r.tokens_per_s is None:
            lines.append(f"{r.name:<30} failed: {r.error}")
            continue
        lines.append(
            f"{r.name:<30} {r.tokens_per_s:>12.1f} {r.tokens_per_s / base:>11.2f} "
            f"{r.tokens_per_s / eager_base:>12.2f} "
            f"{stored[r.name] / variants[0].stored_bytes:>12.3f} {r.compile_s:>9.1f}"
        )
    return lines


def profile_decode(
    model: Any, prompt: torch.Tensor, new_tokens: int, top: int = 12, *, fast: bool = False
) -> str:
    """The ``top`` operators by self CPU time over one decode run, as torch.profiler's table."""
    from torch.profiler import ProfilerActivity, profile

    fn = _generate_fn(model, prompt, new_tokens)
    with fast_cpu_kernels() if fast else nullcontext():
        fn()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)


def profile_compiled_decode(
    model: Any, prompt: torch.Tensor, new_tokens: int, top: int = 12
) -> str:
    """Where one compiled decode's time goes: the ``top`` kernels by self CPU time.

    One timed run of :func:`distill.evaluate.compiled_decode.measure_compiled_decode` (so
    compiled, checked and timed as the report's rows are), its decode steps profiled with
    inductor's kernel profiling on, so each generated kernel shows up under its own name.
    """
    import torch._inductor.config as inductor_config
    from torch.profiler import ProfilerActivity, profile

    from distill.evaluate.compiled_decode import measure_compiled_decode

    prof = profile(activities=[ProfilerActivity.CPU])
    # measure_compiled_decode's own inductor patch leaves this key as set here.
    with torch.inference_mode(), inductor_config.patch({"cpp.enable_kernel_profile": True}):
        rate = measure_compiled_decode(
            model, prompt, new_tokens, repeats=1, steps_context=lambda: prof
        ).tokens_per_s
    steps = new_tokens - 1
    head = f"{steps} compiled decode steps at {rate:.1f} tok/s ({1e3 / rate:.2f} ms/step)"
    return head + "\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)


def prompt_ids(run_dir: Path, prompt_tokens: int) -> torch.Tensor:
    """``(1, P)`` held-out ids: the parity blocks the quantize stage saved, else fixed text."""
    from distill.run_dir import RunDir

    rd = RunDir(run_dir)
    if rd.parity_blocks.is_file():
        from safetensors.torch import load_file

        return load_file(str(rd.parity_blocks))["ids"].reshape(1, -1)[:, :prompt_tokens]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(rd.final)
    text = "Decoding is bound by memory traffic: every generated token reads every weight. " * 20
    return tok(text, return_tensors="pt")["input_ids"][:, :prompt_tokens]


def prepare_from_teacher(run_dir: Path, cfg: Any) -> None:
    """Cut the configured student from the teacher (no training) and quantize it.

    A stand-in for a finished run when only speed and bytes are wanted: ``run_dir/final``
    is the untrained cut student, ``run_dir/quantized`` its variants (parity-checked).
    """
    from distill.caches import cache_root
    from distill.models import build_student, load_teacher
    from distill.quantize import stage as quantize

    if not (run_dir / "final" / "config.json").is_file():
        teacher, tokenizer = load_teacher(cfg.pair.teacher, cache_root(cfg))
        student, _ = build_student(cfg.pair.student, teacher, cfg.train.seed)
        del teacher
        student.save_pretrained(str(run_dir / "final"))
        tokenizer.save_pretrained(str(run_dir / "final"))
    quantize.run(cfg, run_dir)


@dataclass
class DeployedRow:
    """One variant's batch-1 decode in the runtime it deploys to, against its bound."""

    name: str
    runtime: str
    tokens_per_s: float | None
    bytes_per_token: float
    error: str | None = None


def llama_cpp_rows(
    run_dir: Path,
    gguf_types: list[str],
    prompt: torch.Tensor,
    new_tokens: int,
    repeats: int,
    threads: int | None,
) -> list[DeployedRow]:
    """llama.cpp decode of each GGUF file of ``run_dir`` (same prompt and lengths as the torch
    rows). Bytes read per token: the file's tensor bytes plus its F16 KV cache at the mean
    context, as llama.cpp holds them."""
    from transformers import AutoConfig

    from distill.evaluate.memory import kv_cache_bytes_per_token
    from distill.models import llama_cpp_problem, open_gguf, runtime_name
    from distill.run_dir import RunDir

    config = AutoConfig.from_pretrained(str(RunDir(run_dir).final))
    mean_context = prompt.shape[1] + (new_tokens - 1) / 2
    kv = kv_cache_bytes_per_token(config, dtype_bytes=2) * mean_context
    problem = llama_cpp_problem()
    rows = []
    for t in gguf_types:
        path = RunDir(run_dir).gguf_file(t)
        name = f"student-gguf-{t}"
        if problem:
            rows.append(DeployedRow(name, "llama.cpp", None, path.stat().st_size + kv, problem))
            continue
        with open_gguf(path, n_ctx=prompt.shape[1] + new_tokens, threads=threads) as rt:
            read = rt.tensor_bytes() + kv
            r = rt.speed(prompt[0], new_tokens, repeats)
        rows.append(DeployedRow(name, runtime_name(), r["decode_tokens_per_s"], read))
    return rows


def compiled_deployed_rows(
    variants: list[Variant], rows: list[CompiledRow], prompt: torch.Tensor, new_tokens: int
) -> list[DeployedRow]:
    """The compiled torch rows as :class:`DeployedRow`: loaded weight bytes plus fp32 KV."""
    from distill.evaluate.memory import kv_cache_bytes_per_token

    mean_context = prompt.shape[1] + (new_tokens - 1) / 2
    by_name = {v.name: v for v in variants}
    out = []
    for r in rows:
        v = by_name[r.name]
        kv = kv_cache_bytes_per_token(v.model.config) * mean_context
        read = weight_bytes(v.model) + kv  # as loaded for the timed decode
        out.append(DeployedRow(r.name, "torch.compile", r.tokens_per_s, read, r.error))
    return out


def deployed_table(rows: list[DeployedRow], bandwidth: float) -> list[str]:
    """Decode tok/s of every row beside its bandwidth bound and, as the issue's target, the
    ratio to llama.cpp's Q8_0 rate (the speed an int8 deployment is measured against)."""
    q8 = next(
        (
            r.tokens_per_s
            for r in rows
            if r.name.endswith("gguf-q8_0") and r.runtime.startswith("llama.cpp")
        ),
        None,
    )
    lines = [
        f"{'variant':<28} {'runtime':<17} {'MB read/token':>13} {'decode tok/s':>12} "
        f"{'bound':>7} {'of bound':>8} {'x llama.cpp Q8_0':>16}"
    ]
    for r in rows:
        if r.tokens_per_s is None:
            lines.append(f"{r.name:<28} {r.runtime:<17} failed: {r.error}")
            continue
        bound = bandwidth / r.bytes_per_token
        vs_q8 = f"{r.tokens_per_s / q8:>16.2f}" if q8 else f"{'-':>16}"
        lines.append(
            f"{r.name:<28} {r.runtime:<17} {r.bytes_per_token / 1e6:>13.1f} "
            f"{r.tokens_per_s:>12.1f} {bound:>7.1f} {r.tokens_per_s / bound:>8.0%} {vs_q8}"
        )
    return lines
