#!/usr/bin/env python
"""Training throughput of distill's own step on a GPU: tokens/s, MFU and peak memory.

    python scripts/bench/bench_gpu.py                 # ~0.5B student, ~1B teacher, bf16 (a GPU)
    python scripts/bench/bench_gpu.py --tiny          # microscopic models: a CPU smoke run

Both models are built from config with random weights (throughput does not depend on the
values). Each mode runs `distill.train.step.train_step`, the function the real loop calls:
  ce      plain training, no teacher                       (the baseline)
  online  KD with the teacher run every step               (teacher in bf16, frozen)
  cached  KD against stored top-k teacher log-probs        (no teacher forward)
MFU = 6 · N_student · tokens/s ÷ peak bf16 FLOP/s (dense). For online KD, `hfu` also counts
the teacher's forward (2 · N_teacher per token).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from accelerate import Accelerator
from transformers import LlamaConfig, LlamaForCausalLM

from distill.train.chunked_loss import fused_head
from distill.train.losses import KDLoss, TopKTeacher
from distill.train.step import Batch, StepContext, train_step

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def llama(hidden: int, layers: int, inter: int, heads: int, kv: int, vocab: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    )


def peak_flops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


class _InMemoryCache:
    """Stands in for distill.train.teacher_cache.TeacherCache: returns one batch's top-k rows."""

    def __init__(self, rows: TopKTeacher) -> None:
        self.rows = rows

    def lookup(self, block_ids: torch.Tensor, device: torch.device) -> TopKTeacher:
        return self.rows.to(device)


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def main() -> int:
    # Over 80 lines on purpose: one benchmark read top to bottom (build the models at the
    # chosen sizes, time each mode, print the table); its parts share every local.
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--modes", default="ce,online,cached")
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument(
        "--chunk-size",
        type=int,
        default=4096,
        help="positions per chunk of the fused, memory-bounded loss (0: whole logits)",
    )
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--profile", action="store_true", help="print the top kernels of each mode")
    ap.add_argument("--compile", action="store_true", help="torch.compile student and teacher")
    args = ap.parse_args()

    vocab = 49152
    if args.tiny:
        s_cfg, t_cfg = llama(32, 2, 64, 4, 2, 256), llama(48, 3, 96, 4, 2, 256)
        args.batch, args.seq, args.steps, args.warmup, vocab = 2, 32, 2, 1, 256
    else:
        s_cfg = llama(1024, 28, 4096, 16, 8, vocab)  # ~0.49B
        t_cfg = llama(1536, 28, 6144, 24, 8, vocab)  # ~1.04B
    accelerator = Accelerator(mixed_precision="bf16" if torch.cuda.is_available() else "no")
    device = accelerator.device
    torch.manual_seed(0)
    student = LlamaForCausalLM(s_cfg).train()
    teacher = LlamaForCausalLM(t_cfg).eval().requires_grad_(False)
    if device.type == "cuda":
        teacher.to(torch.bfloat16)  # inference only: no master weights needed
    teacher.to(device)
    optimizer = torch.optim.AdamW(
        student.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=device.type == "cuda"
    )
    student, optimizer = accelerator.prepare(student, optimizer)
    n_s, n_t = params(student), params(teacher)
    peak = peak_flops(device, args.peak_tflops)
    tokens = args.batch * args.seq
    print(
        f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; "
        f"threads {torch.get_num_threads()}; student {n_s / 1e9:.3f}B, teacher {n_t / 1e9:.3f}B; "
        f"batch {args.batch} x seq {args.seq} = {tokens} tokens/step; peak bf16 "
        f"{'unknown' if peak is None else f'{peak / 1e12:.0f} TFLOP/s'}"
    )

    chunk = args.chunk_size or None
    if args.tiny and chunk:
        chunk = 16
    heads = (
        [fused_head(accelerator.unwrap_model(student)), fused_head(teacher)]
        if chunk
        else [None, None]
    )
    heads = [None if isinstance(h, str) else h for h in heads]
    print(
        f"loss: chunk size {chunk or 'none (whole logits)'}, "
        f"fused heads: {[h is not None for h in heads]}"
    )
    if args.compile:
        # Fuses the elementwise work (RMSNorm, SiLU, rotary, dtype casts) that the profile
        # shows taking about half of an eager step.
        student = torch.compile(student)
        teacher = torch.compile(teacher)
    ids = torch.randint(0, vocab, (args.batch, args.seq), device=device)
    batch = Batch(input_ids=ids, labels=ids)
    results = []
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        ctx = StepContext(
            student=student,
            teacher=teacher,
            optimizer=optimizer,
            accelerator=accelerator,
            kd_ratio=0.0 if mode == "ce" else 1.0,
            max_grad_norm=1.0,
            kd_loss=KDLoss("forward_kl"),
            chunk_size=chunk,
            student_head=heads[0],
            teacher_head=heads[1],
        )
        if mode == "cached":
            # The real loop reads these rows from disk (distill.train.teacher_cache); here the
            # same top-k tensors sit in memory, so only the step itself is timed.
            with torch.no_grad():
                logits = teacher(input_ids=ids).logits[:, :-1]
            ctx.teacher_cache = _InMemoryCache(TopKTeacher.from_logits(logits, args.top_k))
            del logits
            batch = Batch(input_ids=ids, labels=ids, block_ids=torch.arange(args.batch))
        times = []
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
        for i in range(args.warmup + args.steps):
            t0 = time.perf_counter()
            train_step(ctx, [batch], lr=1e-4, step=i)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + (
                [ProfilerActivity.CUDA] if device.type == "cuda" else []
            )
            with profile(activities=acts) as prof:
                train_step(ctx, [batch], lr=1e-4, step=0)
                if device.type == "cuda":
                    torch.cuda.synchronize()
            key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
            print(prof.key_averages().table(sort_by=key, row_limit=12, max_name_column_width=60))
        sec = statistics.median(times)
        tps = tokens / sec
        row = {
            "mode": mode,
            "step_s": sec,
            "tokens_per_s": tps,
            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30
            if device.type == "cuda"
            else None,
        }
        if peak:
            row["mfu"] = 6 * n_s * tps / peak
            if mode == "online":
                row["hfu"] = (6 * n_s + 2 * n_t) * tps / peak
        results.append(row)
        extra = "".join(f", {k} {row[k]:.1%}" for k in ("mfu", "hfu") if k in row)
        mem = (
            f", peak {row['peak_memory_gib']:.1f} GiB" if row["peak_memory_gib"] is not None else ""
        )
        print(f"{mode:>7}: {sec * 1e3:8.1f} ms/step, {tps:10.0f} tokens/s{extra}{mem}")
    base = next((r for r in results if r["mode"] == "ce"), None)
    if base:
        for r in results:
            if r is not base:
                print(f"{r['mode']} step / ce step: {r['step_s'] / base['step_s']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "student_params": n_s,
                    "teacher_params": n_t,
                    "tokens_per_step": tokens,
                    "results": results,
                },
                f,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
