"""The distillation loop, on ``accelerate.Accelerator`` so ``accelerate launch`` scales it.

Read top to bottom: build (teacher, student, data, optimizer), then one explicit loop of
:func:`train_step` calls with periodic evaluation and checkpoints. The learning rate
(:func:`lr_at`) and the data order (:func:`distill.data.batch_indices`) are pure functions of
the step, so resuming needs only the step, the weights, the optimizer and the RNG.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import Tensor
from tqdm.auto import tqdm

from distill.config import DistillError, PipelineConfig, TrainConfig, cache_root
from distill.data import batch_indices, check_data_inputs, prepare_data
from distill.models.load import (
    check_source,
    check_vocab,
    load_teacher,
    preflight_pretrained_student,
)
from distill.models.student import build_student
from distill.train import teacher_cache
from distill.train.checkpoint import TrainerState, load_checkpoint, resolve_resume, save_checkpoint
from distill.train.losses import (
    KDLoss,
    ProjectedTeacher,
    TopKTeacher,
    chunked_distill_loss,
    cross_entropy_per_token,
    forward_kl_per_token,
    fused_head,
    make_kd_loss,
    reduce_masked,
    scored_positions,
    shift_for_next_token,
)

log = logging.getLogger(__name__)


class NonFiniteError(DistillError):
    """Loss or gradient norm became NaN/Inf; the optimizer was not stepped."""


class OutOfMemory(DistillError):
    """A step ran out of memory."""


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``lr`` then cosine decay to ``lr * min_lr_ratio`` at ``max_steps``."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1.0 + math.cos(math.pi * progress))


@dataclass
class Batch:
    """One micro-batch: ``input_ids``/``labels`` ``(B, T)``, ``attention_mask`` or None, and
    ``block_ids`` ``(B,)``, the rows of ``data.train`` (how the cached teacher finds them)."""

    input_ids: Tensor
    labels: Tensor
    attention_mask: Tensor | None = None
    block_ids: Tensor | None = None


@dataclass
class StepContext:
    student: Any  # as prepared by accelerate (may be DDP/FSDP-wrapped)
    teacher: Any
    optimizer: torch.optim.Optimizer
    accelerator: Accelerator
    kd_ratio: float
    temperature: float
    scale_by_t2: bool
    max_grad_norm: float
    # The divergence with its settings bound (distill.train.losses.make_kd_loss); None: forward KL.
    kd_loss: KDLoss | None = None
    # Positions per chunk of the memory-bounded loss (None: the plain form), and the output
    # projections it is fused with (None: that model's logits are made whole first).
    chunk_size: int | None = None
    student_head: Any = None
    teacher_head: Any = None
    # train.teacher_mode=cached: top-k teacher rows come from here instead of a forward.
    teacher_cache: Any = None


def teacher_targets(ctx: StepContext, batch: Batch) -> Tensor | TopKTeacher | ProjectedTeacher:
    """The teacher's side of positions ``0 .. T-2``: cached top-k rows ``(B, T-1, k)``, or an
    online forward: final hidden states ``(B, T-1, D)`` when the chunked loss makes the
    logits itself, else logits ``(B, T-1, V)``."""
    if ctx.teacher_cache is not None:
        assert batch.block_ids is not None, "the cached teacher needs Batch.block_ids"
        return ctx.teacher_cache.lookup(batch.block_ids, batch.input_ids.device)
    # no_grad rather than inference_mode: the KD loss saves teacher probabilities for
    # the student's backward, and autograd refuses to save inference-mode tensors.
    with torch.no_grad():
        if ctx.teacher_head is not None and ctx.chunk_size is not None:
            out = ctx.teacher(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                output_hidden_states=True,
                logits_to_keep=1,
            )
            weight, bias = ctx.teacher_head
            return ProjectedTeacher(out.hidden_states[-1][:, :-1], weight, bias)
        return ctx.teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[
            :, :-1
        ]


def micro_batch_loss(
    ctx: StepContext, batch: Batch, num_tokens: Tensor
) -> tuple[Tensor, dict[str, float]]:
    """Blended loss of one micro-batch, already divided by the window's token count."""
    kd_loss = ctx.kd_loss or KDLoss("forward_kl", ctx.temperature, ctx.scale_by_t2)
    teacher = teacher_targets(ctx, batch) if ctx.kd_ratio > 0.0 else None
    if ctx.chunk_size is not None:
        # Only scored positions enter the loss; the full (B, T, V) logits are never made
        # when the student's head is fused in.
        valid = scored_positions(batch.labels, batch.attention_mask)
        kwargs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
        if ctx.student_head is not None:
            out = ctx.student(**kwargs, output_hidden_states=True, logits_to_keep=1)
            inputs = out.hidden_states[-1][:, :-1][valid]
        else:
            inputs = ctx.student(**kwargs).logits[:, :-1][valid]
        loss, ce, kd = chunked_distill_loss(
            inputs,
            batch.labels[:, 1:][valid],
            None if teacher is None else teacher[valid],
            head=ctx.student_head,
            kd_loss=kd_loss,
            kd_ratio=ctx.kd_ratio,
            num_tokens=num_tokens,
            chunk_size=ctx.chunk_size,
        )
    else:
        logits = ctx.student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        s_logits, targets, valid = shift_for_next_token(logits, batch.labels, batch.attention_mask)
        ce = reduce_masked(cross_entropy_per_token(s_logits, targets), valid, num_tokens)
        if isinstance(teacher, ProjectedTeacher):
            teacher = teacher.logits()
        if teacher is not None:
            kd = reduce_masked(kd_loss(s_logits, teacher), valid, num_tokens)
        else:
            kd = torch.zeros((), device=ce.device)
        loss = (1.0 - ctx.kd_ratio) * ce + ctx.kd_ratio * kd
    del teacher
    return loss, {"ce": ce.item(), "kd": kd.item(), "loss": loss.item()}


def train_step(
    ctx: StepContext, micro_batches: list[Batch], lr: float, step: int
) -> dict[str, float]:
    """One optimizer step over ``micro_batches`` (the accumulation window).

    Every micro-batch loss is divided by the number of scored tokens in the whole window
    across all processes, so 4 × 1 and 1 × 4 micro-batching give the same gradient even with
    padding. DDP averages gradients over processes, hence the ``num_processes`` factor.

    Raises:
        NonFiniteError: before the optimizer step, when the loss or gradient norm is not finite.
    """
    acc = ctx.accelerator
    local = sum(int(scored_positions(b.labels, b.attention_mask).sum()) for b in micro_batches)
    num_tokens = acc.reduce(torch.tensor(float(local), device=acc.device), reduction="sum")
    for group in ctx.optimizer.param_groups:
        group["lr"] = lr
    totals = {"ce": 0.0, "kd": 0.0, "loss": 0.0}
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        sync = acc.no_sync(ctx.student) if not last else _nullcontext()
        with sync:
            loss, parts = micro_batch_loss(ctx, batch, num_tokens)
            acc.backward(loss * acc.num_processes)
        for k in totals:
            totals[k] += parts[k]
    if not math.isfinite(totals["loss"]):
        ctx.optimizer.zero_grad(set_to_none=True)
        raise NonFiniteError(
            f"step {step}: loss is {totals['loss']} (ce={totals['ce']}, kd={totals['kd']}); "
            "the optimizer was not stepped and the last checkpoint is the resume point"
        )
    grad_norm = acc.clip_grad_norm_(ctx.student.parameters(), ctx.max_grad_norm)
    grad_norm_value = float(grad_norm)
    if not math.isfinite(grad_norm_value):
        ctx.optimizer.zero_grad(set_to_none=True)
        raise NonFiniteError(
            f"step {step}: gradient norm is {grad_norm_value}; the optimizer was not stepped "
            "and the last checkpoint is the resume point"
        )
    ctx.optimizer.step()
    ctx.optimizer.zero_grad(set_to_none=True)
    # Losses are summed over processes' shares; the mean over the global window is the sum.
    reduced = acc.reduce(
        torch.tensor([totals["ce"], totals["kd"], totals["loss"]], device=acc.device),
        reduction="sum",
    )
    return {
        "ce": float(reduced[0]),
        "kd": float(reduced[1]),
        "loss": float(reduced[2]),
        "grad_norm": grad_norm_value,
        "lr": lr,
        "tokens": float(num_tokens),
    }


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def micro_batches_for_step(
    blocks: Tensor, cfg: TrainConfig, step: int, rank: int, world: int, device: torch.device
) -> list[Batch]:
    """This process's share of global step ``step``: ``grad_accum_steps`` micro-batches."""
    out = []
    for k in range(cfg.grad_accum_steps):
        idx = batch_indices(
            blocks.shape[0], cfg.batch_size * world, step * cfg.grad_accum_steps + k, cfg.seed
        )
        mine = idx[rank * cfg.batch_size : (rank + 1) * cfg.batch_size]
        ids = blocks[mine].to(device)
        out.append(Batch(input_ids=ids, labels=ids, block_ids=torch.tensor(mine)))
    return out


@torch.inference_mode()
def teacher_logits_for(teacher: Any, blocks: Tensor, batch_size: int) -> list[Tensor]:
    """Teacher logits ``(b, T, V)`` per eval batch, computed once and reused."""
    return [
        teacher(input_ids=blocks[i : i + batch_size]).logits.float()
        for i in range(0, len(blocks), batch_size)
    ]


@torch.inference_mode()
def quick_eval(
    model: Any, blocks: Tensor, teacher_logits: list[Tensor], batch_size: int
) -> dict[str, float]:
    """Val perplexity, mean KL(teacher ‖ model) and top-1 agreement on ``blocks``."""
    was_training = model.training
    model.eval()
    ce_sum = kl_sum = agree = count = 0.0
    for j, i in enumerate(range(0, len(blocks), batch_size)):
        ids = blocks[i : i + batch_size]
        logits = model(input_ids=ids).logits.float()
        s, targets, valid = shift_for_next_token(logits, ids)
        t = teacher_logits[j][:, :-1]
        ce_sum += float(cross_entropy_per_token(s, targets)[valid].sum())
        kl_sum += float(forward_kl_per_token(s, t, scale_by_t2=False)[valid].sum())
        agree += float((s.argmax(-1) == t.argmax(-1))[valid].sum())
        count += float(valid.sum())
    if was_training:
        model.train()
    return {
        "val_perplexity": math.exp(ce_sum / count),
        "val_kl_to_teacher": kl_sum / count,
        "val_top1_agreement": agree / count,
    }


def place_teacher(teacher: Any, accelerator: Accelerator, placement: str) -> Any:
    """Put the frozen teacher where the launch wants it.

    ``replicate``: a full copy on every device, cast to the mixed-precision dtype (it only
    runs forward, so it needs no fp32 master weights). ``shard``: under FSDP each process
    keeps a shard and layers are all-gathered in forward (accelerate's FSDP2 wrapper);
    under DeepSpeed ZeRO-3 the teacher gets its own inference engine, as DeepSpeed requires
    for a second model. Without FSDP/DeepSpeed, ``shard`` falls back to ``replicate``.
    """
    from accelerate.utils import DistributedType

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision)
    kind = accelerator.distributed_type
    if placement == "shard" and kind == DistributedType.FSDP:
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        if dtype is not None:
            teacher.to(dtype)
        return fsdp2_prepare_model(accelerator, teacher).eval()
    if placement == "shard" and kind == DistributedType.DEEPSPEED:
        import deepspeed

        plugin = accelerator.state.deepspeed_plugin
        ds_config = {
            "train_micro_batch_size_per_gpu": 1,
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
            "bf16": {"enabled": dtype is torch.bfloat16},
            "fp16": {"enabled": dtype is torch.float16},
        }
        if plugin is not None and plugin.zero_stage != 3:
            log.info("teacher_placement=shard needs ZeRO-3; replicating the teacher instead")
        else:
            engine, *_ = deepspeed.initialize(model=teacher, config=ds_config)
            return engine.module.eval()
    if dtype is not None and accelerator.device.type != "cpu":
        teacher.to(dtype)
    return teacher.to(accelerator.device)


def fused_heads(
    cfg: PipelineConfig, accelerator: Accelerator, student: Any, teacher: Any
) -> tuple[Any, Any]:
    """The output projections the chunked loss is fused with; None (reason logged) where
    logits must be made whole: loss.chunk_size=null, sharded weights, or an architecture
    whose logits are not ``lm_head(last hidden state)``."""
    if cfg.loss.chunk_size is None:
        return None, None
    from accelerate.utils import DistributedType

    online_kd = cfg.train.teacher_mode == "online" and cfg.loss.kd_ratio > 0.0
    heads = []
    for name, model, needed in (("student", student, True), ("teacher", teacher, online_kd)):
        head = None
        if needed:
            kind = accelerator.distributed_type
            if kind in (DistributedType.FSDP, DistributedType.DEEPSPEED):
                head = f"{kind} shards the output projection"
            else:
                head = fused_head(model)
            if isinstance(head, str):
                log.info("loss: %s logits made whole, then chunked (%s)", name, head)
                head = None
        heads.append(head)
    return heads[0], heads[1]


def config_fingerprint(cfg: PipelineConfig, num_processes: int = 1) -> str:
    """Hash of everything that shapes the trajectory (not eval/quant/publish settings).

    The per-process batch enters as the global batch, so a DDP run may resume on another
    process count as long as batch_size × processes is unchanged.
    """
    bookkeeping = {
        "resume",
        "eval_every_n_steps",
        "eval_max_blocks",
        "save_every_n_steps",
        "keep_last_n_checkpoints",
        "log_every_n_steps",
    }
    trajectory = {k: v for k, v in asdict(cfg.train).items() if k not in bookkeeping}
    trajectory["batch_size"] = cfg.train.batch_size * num_processes
    payload = json.dumps(
        [asdict(cfg.pair), asdict(cfg.data), asdict(cfg.loss), trajectory],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def preflight(cfg: PipelineConfig) -> None:
    """Checks that need no model weights: paths exist, data files are readable."""
    check_source(
        cfg.pair.teacher.name_or_path, "pair.teacher.name_or_path", cfg.pair.teacher.gguf_file
    )
    if cfg.pair.student.init == "pretrained":
        assert cfg.pair.student.name_or_path is not None
        check_source(cfg.pair.student.name_or_path, "pair.student.name_or_path")
    check_data_inputs(cfg.data)


class _Logger:
    """metrics.jsonl plus TensorBoard, written by the main process only."""

    def __init__(self, run_dir: Path, enabled: bool) -> None:
        self.enabled = enabled
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.path = run_dir / "metrics.jsonl"
            self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, step: int, metrics: dict[str, float], kind: str) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "kind": kind, **metrics}) + "\n")
        assert self.writer is not None
        for k, v in metrics.items():
            self.writer.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def run(cfg: PipelineConfig, run_dir: Path) -> Path:
    """Distill the configured student; return the ``final/`` folder.

    Raises:
        DistillError: bad input (named), non-finite loss, out of memory.
    """
    preflight(cfg)
    tc = cfg.train
    # cpu=True without CUDA: that is what makes a multi-process launch use gloo (MULTI_CPU)
    # instead of silently running every process as an independent single-process job.
    accelerator = Accelerator(mixed_precision=tc.mixed_precision, cpu=not torch.cuda.is_available())
    log.info(
        "accelerate: %s, %d process(es), mixed precision %s, device %s",
        accelerator.distributed_type.value,
        accelerator.num_processes,
        accelerator.mixed_precision,
        accelerator.device,
    )
    set_seed(tc.seed)
    main = accelerator.is_main_process
    run_dir.mkdir(parents=True, exist_ok=True)

    teacher, tokenizer = load_teacher(cfg.pair.teacher, cache_root(cfg))
    if cfg.pair.student.init == "pretrained":
        preflight_pretrained_student(cfg.pair.student, tokenizer, int(teacher.config.vocab_size))
    student, student_tok = build_student(cfg.pair.student, teacher, tc.seed)
    check_vocab(
        tokenizer,
        student_tok or tokenizer,
        int(teacher.config.vocab_size),
        int(student.config.vocab_size),
    )
    data = prepare_data(cfg.data, tokenizer, cache_root(cfg))
    log.info(
        "data: %d train / %d val blocks of %d tokens",
        len(data.train),
        len(data.val),
        cfg.data.block_size,
    )

    if main and not (run_dir / "student_init" / "config.json").exists():
        student.save_pretrained(str(run_dir / "student_init"))
        tokenizer.save_pretrained(str(run_dir / "student_init"))

    student.train()
    optimizer = torch.optim.AdamW(
        student.parameters(), lr=tc.lr, betas=(0.9, 0.95), weight_decay=tc.weight_decay
    )
    student, optimizer = accelerator.prepare(student, optimizer)
    teacher = place_teacher(teacher, accelerator, tc.teacher_placement)
    raw_student = accelerator.unwrap_model(student)

    ckpt_dir = run_dir / "checkpoints"
    fingerprint = config_fingerprint(cfg, accelerator.num_processes)
    start_step, tokens_seen = 0, 0
    resume_from = resolve_resume(tc.resume, ckpt_dir)
    if resume_from is not None:
        state = load_checkpoint(resume_from, model=raw_student, optimizer=optimizer)
        if state.config_fingerprint != fingerprint:
            raise DistillError(
                f"checkpoint {resume_from} was written by a run with another pair/data/loss/train "
                "config; resume with the same settings or start a new run dir"
            )
        start_step, tokens_seen = state.step, state.tokens_seen
        log.info("resumed from %s at step %d", resume_from, start_step)

    student_head, teacher_head = fused_heads(cfg, accelerator, raw_student, teacher)
    cache = None
    if tc.teacher_mode == "cached" and cfg.loss.kd_ratio > 0.0:
        needed = teacher_cache.blocks_for_steps(
            len(data.train), tc, accelerator.num_processes, start_step
        )
        cache = teacher_cache.prepare(
            cfg, teacher, tokenizer, data.train, needed, main, accelerator.wait_for_everyone
        )

    eval_blocks = data.val[: tc.eval_max_blocks].to(accelerator.device)
    eval_bs = max(1, min(tc.batch_size, 8))
    teacher_eval = teacher_logits_for(teacher, eval_blocks, eval_bs) if main else []
    if cache is not None:
        teacher = None  # the eval logits above were its last use: free its memory

    ctx = StepContext(
        student=student,
        teacher=teacher,
        optimizer=optimizer,
        accelerator=accelerator,
        kd_ratio=cfg.loss.kd_ratio,
        temperature=cfg.loss.temperature,
        scale_by_t2=cfg.loss.scale_by_t2,
        max_grad_norm=tc.max_grad_norm,
        kd_loss=make_kd_loss(cfg.loss),
        chunk_size=cfg.loss.chunk_size,
        student_head=student_head,
        teacher_head=teacher_head,
        teacher_cache=cache,
    )
    logger = _Logger(run_dir, main)
    bar = tqdm(
        range(start_step, tc.max_steps),
        initial=start_step,
        total=tc.max_steps,
        desc="distill",
        disable=not main,
        dynamic_ncols=True,
    )
    last_saved = start_step
    try:
        for step in bar:
            t0 = time.perf_counter()
            micro = micro_batches_for_step(
                data.train,
                tc,
                step,
                accelerator.process_index,
                accelerator.num_processes,
                accelerator.device,
            )
            try:
                metrics = train_step(ctx, micro, lr_at(step, tc), step)
            except torch.OutOfMemoryError:
                raise OutOfMemory(
                    f"out of memory at step {step}: lower train.batch_size (now {tc.batch_size}) "
                    "and raise train.grad_accum_steps to keep the batch, lower loss.chunk_size, "
                    "or use train.teacher_mode=cached so the teacher is not held; resume from "
                    "the last checkpoint with train.resume=auto"
                ) from None
            elapsed = time.perf_counter() - t0
            tokens_seen += int(metrics["tokens"])
            metrics["tokens_per_s"] = metrics["tokens"] / elapsed
            done = step + 1
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
            if done % tc.log_every_n_steps == 0 or done == tc.max_steps:
                logger.log(done, metrics, "train")
            if done % tc.eval_every_n_steps == 0 or done == tc.max_steps:
                if main:
                    ev = quick_eval(raw_student, eval_blocks, teacher_eval, eval_bs)
                    logger.log(done, ev, "eval")
                    bar.write(
                        f"step {done}: val ppl {ev['val_perplexity']:.2f}, "
                        f"KL {ev['val_kl_to_teacher']:.3f}, top-1 {ev['val_top1_agreement']:.3f}"
                    )
                accelerator.wait_for_everyone()
            if done % tc.save_every_n_steps == 0 or done == tc.max_steps:
                if main:
                    save_checkpoint(
                        ckpt_dir,
                        model=raw_student,
                        optimizer=optimizer,
                        state=TrainerState(done, tokens_seen, fingerprint),
                        keep_last_n=tc.keep_last_n_checkpoints,
                    )
                last_saved = done
                accelerator.wait_for_everyone()
    finally:
        logger.close()
        bar.close()

    final = run_dir / "final"
    if main:
        _save_final(raw_student, tokenizer, final)
    accelerator.wait_for_everyone()
    if main:
        log.info(
            "trained %d steps (last checkpoint at %d); final student in %s",
            tc.max_steps,
            last_saved,
            final,
        )
    return final


def _save_final(model: Any, tokenizer: Any, final: Path) -> None:
    import os
    import shutil

    staging = final.with_name(f".staging-final-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(str(staging), safe_serialization=True)
    tokenizer.save_pretrained(str(staging))
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
