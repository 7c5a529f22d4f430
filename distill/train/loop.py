"""The distillation loop, on ``accelerate.Accelerator`` so ``accelerate launch`` scales it.

:func:`run` reads top to bottom: skip a run dir this config already finished, build (teacher,
student, data, optimizer), resume, then one explicit loop of
:func:`distill.train.step.train_step` calls with periodic evaluation and checkpoints. The
learning rate (:func:`~distill.train.step.lr_at`) and the data order
(:func:`distill.data.batch_indices`) are pure functions of the step, so resuming needs only
the step, the weights, the optimizer and the RNG.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import set_seed
from torch import Tensor
from tqdm.auto import tqdm

from distill.caches import cache_root
from distill.config import PipelineConfig, TrainConfig
from distill.data import PackedSplits, mix_blocks, pack_token_lists, splits_for
from distill.errors import DistillError
from distill.metrics import TeacherSide, score_blocks, teacher_sides
from distill.models import Teacher, build_student, check_vocab
from distill.preflight import preflight
from distill.run_dir import RunDir, clear_leftovers, replace_folder, staging_folder
from distill.train import teacher_cache
from distill.train.checkpoint import (
    TrainerState,
    full_model_state,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
)
from distill.train.hidden_states import hidden_match
from distill.train.losses import make_kd_loss
from distill.train.on_policy import SampleSettings, check_sampling_supported
from distill.train.placement import check_placement, fused_heads, place_teacher
from distill.train.qad import fake_quantized, grid_at
from distill.train.run_state import config_fingerprint, finished_state
from distill.train.short_train import finalists
from distill.train.step import (
    StepContext,
    explain_out_of_memory,
    lr_at,
    micro_batches_for_step,
    train_step,
)

log = logging.getLogger(__name__)


@torch.inference_mode()
def quick_eval(
    model: Any, blocks: Tensor, reference: list[TeacherSide], batch_size: int
) -> dict[str, float]:
    """Val perplexity, mean KL(teacher ‖ model) and top-1 agreement on ``blocks`` ``(N, T)``.

    ``reference`` comes from :func:`distill.metrics.teacher_sides` on the same blocks and
    batch size; the figures are :mod:`distill.metrics`'.
    """
    sums = score_blocks(model, blocks, batch_size, reference)
    return {
        "val_perplexity": sums.perplexity,
        "val_kl_to_teacher": sums.kl,
        "val_top1_agreement": sums.top1,
    }


class _Logger:
    """metrics.jsonl plus TensorBoard, written by the main process only."""

    def __init__(self, rd: RunDir, enabled: bool) -> None:
        self.enabled = enabled
        self.writer = None
        self.path = rd.metrics
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(rd.tensorboard))

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


@dataclass
class _Built:
    """What :func:`_build` makes: the models, data and optimizer, prepared by accelerate."""

    accelerator: Accelerator
    student: Any  # as prepared (may be DDP/FSDP-wrapped): what the step runs
    raw_student: Any  # unwrapped: what is saved, restored and evaluated
    teacher: Any
    tokenizer: Any
    data: PackedSplits  # training blocks as trained on (the teacher's text mixed in)
    corpus: PackedSplits  # the corpus splits alone (held-out and calibration blocks)
    optimizer: torch.optim.Optimizer
    teacher_key: str
    teacher_altered: bool


@dataclass
class _EvalSet:
    """Held-out blocks ``(n, T)`` of the periodic eval and the teacher's side of them."""

    blocks: Tensor
    teacher_eval: list[TeacherSide]
    batch_size: int


def run(
    cfg: PipelineConfig,
    run_dir: Path,
    *,
    teacher: Teacher | None = None,
    splits: PackedSplits | None = None,
) -> Path:
    """Distill the configured student; return the ``final/`` folder.

    A run dir whose ``final/`` this config already finished is left as it is, with one log
    line: ``scripts/pipeline.py run_dir=<run>`` after ``accelerate launch scripts/distill.py``
    goes straight on to quantizing. With ``train.resume=auto`` (the default) a run killed
    midway continues from its newest complete checkpoint.

    Args:
        teacher: the run's teacher handle (loaded here on first use); a cached-teacher run
            releases its weights after building the cache, and a run that cast or sharded
            them for the launch releases them at its end, so later stages reload them whole.
        splits: the run's packed corpus, prepared by a caller that ran the pre-flight checks
            first (:func:`distill.pipeline.run`); when None, this stage runs
            :func:`distill.preflight.preflight` and prepares them itself.

    Raises:
        DistillError: bad input (named), non-finite loss, out of memory, or a ``final/`` that
            another config made (see :func:`finished_state`).
    """
    teacher = teacher or Teacher(cfg.pair.teacher, cache_root(cfg))
    if splits is None:
        preflight(cfg, teacher)
    rd = RunDir(run_dir)
    done = finished_state(cfg, rd)
    if done is not None:
        log.info(
            "train: %s already holds this config's student, trained to step %d; not training again",
            rd.final,
            done.step,
        )
        if _selection_pending(cfg, rd) and PartialState().is_main_process:
            _select_checkpoint(cfg, rd, None)  # a crash came between final/ and the selection
        return rd.final
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
    check_placement(tc.teacher_placement, accelerator)  # before any weights load
    if tc.qad is not None and accelerator.num_processes > 1:
        raise DistillError("train.qad runs in one process: launch without accelerate")
    set_seed(tc.seed)
    rd.root.mkdir(parents=True, exist_ok=True)
    clear_leftovers(rd.final)
    built = _build(cfg, rd, accelerator, teacher, splits)
    start = _resume(cfg, rd, built)
    ctx, evals = _step_context(cfg, built, start.step)
    if built.teacher is None:  # read from its cache from now on: not held while training
        teacher.release()
    last_saved = _train_steps(tc, rd, built, ctx, evals, start)

    main = accelerator.is_main_process
    raw_student, tokenizer = built.raw_student, built.tokenizer
    final = rd.final
    weights = full_model_state(raw_student)  # every rank: a collective under FSDP2
    if main:
        _save_final(raw_student, tokenizer, final, weights)
    accelerator.wait_for_everyone()
    if main:
        log.info(
            "trained %d steps (last checkpoint at %d); final student in %s",
            tc.max_steps,
            last_saved,
            final,
        )
        if tc.select_checkpoint == "best_quantized":  # final/ is whole: swap the winner in
            _select_checkpoint(cfg, rd, built.corpus)
    if built.teacher_altered:
        teacher.release()  # cast or sharded for the launch: later stages reload it whole
    return final


def _selection_pending(cfg: PipelineConfig, rd: RunDir) -> bool:
    """``best_quantized`` is asked for and no selection record says it was made."""
    from distill.train.select_checkpoint import SELECTION_FILE

    return (
        cfg.train.select_checkpoint == "best_quantized" and not (rd.root / SELECTION_FILE).is_file()
    )


def _select_checkpoint(cfg: PipelineConfig, rd: RunDir, corpus: PackedSplits | None) -> None:
    """``train.select_checkpoint=best_quantized`` on the run's own corpus splits (main
    process); with ``corpus`` None the selection prepares them itself."""
    # Imported here: selection pulls in the quantize stage, training does not.
    from distill.train import select_checkpoint

    select_checkpoint.run(cfg, rd.root, splits=corpus)


def _build(
    cfg: PipelineConfig,
    rd: RunDir,
    accelerator: Accelerator,
    handle: Teacher,
    splits: PackedSplits | None,
) -> _Built:
    """Load the teacher, build the student, check their vocabularies, prepare the data, save
    ``student_init/`` once, make the optimizer and place both models."""
    tc = cfg.train
    teacher, tokenizer = handle.model, handle.tokenizer
    corpus = splits_for(cfg, tokenizer, splits)
    # pair.student.num_layers alone: the main process runs (or reads) the cached greedy
    # search; the others then read its file instead of searching too.
    with accelerator.main_process_first():
        student, student_tok = build_student(
            cfg.pair.student,
            teacher,
            tc.seed,
            train_blocks=corpus.train,
            cache_dir=cache_root(cfg),
            teacher_key=lambda: handle.weights_key,
            finalists=finalists(cfg, teacher) if cfg.pair.student.budget is not None else None,
        )
    check_vocab(
        tokenizer,
        student_tok or tokenizer,
        int(teacher.config.vocab_size),
        int(student.config.vocab_size),
    )
    # After the student: a layer search scores the corpus blocks, whatever the training mix.
    data = _with_teacher_text(cfg, corpus, handle, accelerator)
    log.info(
        "data: %d train / %d val blocks of %d tokens",
        len(data.train),
        len(data.val),
        cfg.data.block_size,
    )

    if accelerator.is_main_process and not (rd.student_init / "config.json").exists():
        student.save_pretrained(str(rd.student_init))
        tokenizer.save_pretrained(str(rd.student_init))

    student.train()
    optimizer = torch.optim.AdamW(
        student.parameters(), lr=tc.lr, betas=(0.9, 0.95), weight_decay=tc.weight_decay
    )
    student, optimizer = accelerator.prepare(student, optimizer)
    placed, altered = place_teacher(teacher, accelerator, tc.teacher_placement)
    raw_student = accelerator.unwrap_model(student)
    key = handle.weights_key if _needs_teacher_key(cfg) else ""
    return _Built(
        accelerator, student, raw_student, placed, tokenizer, data, corpus, optimizer, key, altered
    )


def _needs_teacher_key(cfg: PipelineConfig) -> bool:
    """The teacher cache is filed under the teacher's weights hash (hashed once per run)."""
    return cfg.train.teacher_mode == "cached" and cfg.loss.kd_ratio > 0.0


def _with_teacher_text(
    cfg: PipelineConfig, data: PackedSplits, teacher: Teacher, accelerator: Accelerator
) -> PackedSplits:
    """``data`` with ``data.teacher_generated_fraction`` of its training blocks replaced by the
    teacher's own text (the main process generates it once; the others read its cache)."""
    fraction = cfg.data.teacher_generated_fraction
    if fraction == 0.0:
        return data
    from distill.prompts import has_chat_template
    from distill.teacher_text import general_questions, training_samples

    tokenizer = teacher.tokenizer
    with accelerator.main_process_first():
        # The evaluation's general questions are never among the teacher's own training ones.
        asked = cfg.data.generated_own_share > 0 and "general" in cfg.eval.fidelity
        asked = asked and has_chat_template(tokenizer)
        exclude = (
            general_questions(cfg, teacher.model, tokenizer, teacher.weights_key) if asked else []
        )
        samples = training_samples(
            cfg.data,
            teacher.model,
            tokenizer,
            cache_root(cfg),
            teacher_weights=teacher.weights_key,
            exclude=exclude,
        )
    generated = pack_token_lists(
        [s.prompt + s.completion for s in samples], tokenizer.eos_token_id, cfg.data.block_size
    )
    train = mix_blocks(data.train, generated, fraction)
    log.info(
        "data: %d teacher sample(s) fill %d block(s); training on %d blocks, %.0f%% of them "
        "the teacher's text",
        len(samples),
        len(generated),
        len(train),
        100 * fraction,
    )
    return replace(data, train=train)


def _resume(cfg: PipelineConfig, rd: RunDir, built: _Built) -> TrainerState:
    """The state training starts from: step 0, or the checkpoint ``train.resume`` picks,
    restored into the student, optimizer and RNGs.

    Raises:
        DistillError: that checkpoint was written with another config.
    """
    num_processes = built.accelerator.num_processes
    start = TrainerState(0, 0, config_fingerprint(cfg, num_processes), num_processes)
    resume_from = resolve_resume(cfg.train.resume, rd.checkpoints)
    if resume_from is None:
        return start
    state = load_checkpoint(resume_from, model=built.raw_student, optimizer=built.optimizer)
    if state.config_fingerprint != start.config_fingerprint:
        raise DistillError(
            f"checkpoint {resume_from} was written by a run with another pair/data/loss/train "
            "config; resume with the same settings or start a new run dir"
        )
    log.info("resumed from %s at step %d", resume_from, state.step)
    return replace(start, step=state.step, tokens_seen=state.tokens_seen)


def _step_context(
    cfg: PipelineConfig, built: _Built, start_step: int
) -> tuple[StepContext, _EvalSet]:
    """The step's context (fused heads, the teacher cache if used, on-policy sampling and
    hidden-state matching as configured) and the periodic eval set.

    Raises:
        HiddenStateError: hidden-state matching asked for a student and teacher it cannot
            pair (checked here, before any step).
        DistillError: on-policy sampling under sharded weights (FSDP, ZeRO-3).
    """
    tc, acc = cfg.train, built.accelerator
    main = acc.is_main_process
    hidden = hidden_match(cfg.loss, built.raw_student, built.teacher)
    if tc.on_policy_fraction > 0.0:
        check_sampling_supported(acc.distributed_type)
    student_head, teacher_head = fused_heads(cfg, acc, built.raw_student, built.teacher)
    cache = None
    if tc.teacher_mode == "cached" and cfg.loss.kd_ratio > 0.0:
        needed = teacher_cache.blocks_for_steps(
            len(built.data.train), tc, acc.num_processes, start_step
        )
        cache = teacher_cache.prepare(
            cfg,
            built.teacher,
            built.teacher_key,
            built.tokenizer,
            built.data.train,
            needed,
            main,
            acc.wait_for_everyone,
        )

    eval_blocks = built.data.val[: tc.eval_max_blocks].to(acc.device)
    eval_bs = max(1, min(tc.batch_size, 8))
    teacher = built.teacher
    teacher_eval = teacher_sides(teacher, eval_blocks, eval_bs) if main else []
    if cache is not None:
        # The eval log-probs above were its last use: free its memory (the run's handle
        # reloads it when a later stage needs it).
        teacher = built.teacher = None

    ctx = StepContext(
        student=built.student,
        teacher=teacher,
        optimizer=built.optimizer,
        accelerator=acc,
        kd_ratio=cfg.loss.kd_ratio,
        max_grad_norm=tc.max_grad_norm,
        kd_loss=make_kd_loss(cfg.loss),
        chunk_size=cfg.loss.chunk_size,
        student_head=student_head,
        teacher_head=teacher_head,
        teacher_cache=cache,
        sampling=(
            SampleSettings(tc.sample_prompt_tokens, tc.sample_tokens, tc.sample_temperature)
            if tc.on_policy_fraction > 0.0
            else None
        ),
        hidden=hidden,
    )
    return ctx, _EvalSet(eval_blocks, teacher_eval, eval_bs)


def _train_steps(
    tc: TrainConfig,
    rd: RunDir,
    built: _Built,
    ctx: StepContext,
    evals: _EvalSet,
    start: TrainerState,
) -> int:
    """Steps ``start.step .. max_steps - 1``: log, evaluate and checkpoint on their schedules.

    Returns:
        The step of the last checkpoint saved (``start.step`` if none was).
    """
    acc = built.accelerator
    main = acc.is_main_process
    logger = _Logger(rd, main)
    bar = tqdm(
        range(start.step, tc.max_steps),
        initial=start.step,
        total=tc.max_steps,
        desc="distill",
        disable=not main,
        dynamic_ncols=True,
    )
    tokens_seen, last_saved = start.tokens_seen, start.step
    try:
        for step in bar:
            t0 = time.perf_counter()
            micro = micro_batches_for_step(
                built.data.train, tc, step, acc.process_index, acc.num_processes, acc.device
            )
            grid = grid_at(tc.qad, tc.qad_steps, tc.max_steps, step)
            with explain_out_of_memory(step, tc), fake_quantized(built.raw_student, grid):
                metrics = train_step(ctx, micro, lr_at(step, tc), step)
            elapsed = time.perf_counter() - t0
            tokens_seen += int(metrics["tokens"])
            metrics["tokens_per_s"] = metrics["tokens"] / elapsed
            done = step + 1
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
            if done % tc.log_every_n_steps == 0 or done == tc.max_steps:
                logger.log(done, metrics, "train")
            if done % tc.eval_every_n_steps == 0 or done == tc.max_steps:
                if main:
                    ev = quick_eval(
                        built.raw_student, evals.blocks, evals.teacher_eval, evals.batch_size
                    )
                    logger.log(done, ev, "eval")
                    bar.write(
                        f"step {done}: val ppl {ev['val_perplexity']:.2f}, "
                        f"KL {ev['val_kl_to_teacher']:.3f}, top-1 {ev['val_top1_agreement']:.3f}"
                    )
                acc.wait_for_everyone()
            if done % tc.save_every_n_steps == 0 or done == tc.max_steps:
                save_checkpoint(  # every rank: under FSDP2 gathering the state is collective
                    rd.checkpoints,
                    model=built.raw_student,
                    optimizer=built.optimizer,
                    state=replace(start, step=done, tokens_seen=tokens_seen),
                    keep_last_n=tc.keep_last_n_checkpoints,
                    is_main=main,
                )
                last_saved = done
                acc.wait_for_everyone()
    finally:
        logger.close()
        bar.close()
    return last_saved


def _save_final(
    model: Any, tokenizer: Any, final: Path, weights: dict[str, Tensor] | None = None
) -> None:
    """Write the student (``weights`` when gathered from FSDP2 shards) and tokenizer to
    ``final/``, swapped in whole (never half-written)."""
    staging = staging_folder(final)
    model.save_pretrained(str(staging), safe_serialization=True, state_dict=weights)
    tokenizer.save_pretrained(str(staging))
    replace_folder(staging, final)
