"""Score every model of a run on the same held-out blocks and write the comparison.

Variants: ``teacher``, ``student_init`` (before distillation), ``student`` (``final/``),
``student-<method>`` for each quantized folder and ``student-gguf-<type>`` for each GGUF file,
as :func:`distill.run_dir.variants` lists them, then ``teacher-gguf-f16`` (the teacher exported
to GGUF F16, when there are GGUF rows and ``eval.teacher_gguf``). GGUF rows are scored and
timed in llama.cpp, the runtime they deploy to (:mod:`distill.evaluate.gguf_runtime`); the
others in PyTorch. Every row has ``bits_per_weight`` (weight bytes x 8 / parameters), its
``runtime`` and ``deployed_*`` speed (:func:`distill.evaluate.speed.deployed_fields`), and
quantized rows the ``parity`` figures of the quantize stage. Quality is measured against the
teacher on the first ``eval.max_blocks`` validation blocks (:mod:`distill.evaluate.metrics`):

* perplexity = exp(mean next-token cross-entropy), in nats per token before exp;
* ``kl_to_teacher`` = mean over the same positions of KL(teacher || variant), in nats;
* ``top1_agreement`` = fraction of positions where the argmax tokens agree.

Each row also carries a ``fidelity`` dict (:mod:`distill.evaluate.fidelity`): the same three
figures on the teacher's own text and on each extra corpus, and the teacher's NLL of the
variant's greedy answers to held-out prompts against its NLL of its own.

The teacher's log-probabilities are computed once, during the teacher's own pass, kept on
the CPU in fp32 (``max_blocks * block_size * vocab * 4`` bytes, 1.6 GB for 32 x 256 x 49152)
and reused for every other variant in the same batch order.

Footprint and speed: ``weight_bytes`` counts the bytes the loaded tensors really hold (see
:mod:`distill.models.footprint`), ``disk_bytes`` the variant folder's weight files, and
``peak_memory_bytes`` the growth of memory from just before the variant is loaded to the end
of its evaluation (see :class:`distill.evaluate.memory.PeakMemory` for how, on CPU and
CUDA). Prefill and decode speeds (:mod:`distill.evaluate.speed`) are medians over
``eval.repeats`` timed runs after one warm-up, at batch size 1. Variants named in
``eval.compiled_decode`` are also timed compiled (:mod:`distill.evaluate.compiled_decode`),
after their peak-memory window closes; that compiled decode is their deployed speed. The files
are written by :mod:`distill.evaluate.report`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from distill.config import DistillError, EvalConfig, PipelineConfig, cache_root
from distill.evaluate.fidelity import Fidelity, build_fidelity, check_extra_corpora, fidelity_inputs
from distill.evaluate.gguf_runtime import TEACHER_ROW, gguf_row, teacher_gguf
from distill.evaluate.memory import (
    BANDWIDTH_METHOD,
    PeakMemory,
    add_memory_fields,
    kv_cache_bytes_per_token,
    kv_dtype_bytes,
    measure_bandwidth,
)
from distill.evaluate.metrics import blocks_problem, model_device, quality_fields, score_blocks
from distill.evaluate.report import write_report
from distill.evaluate.speed import (
    compiled_decode_fields,
    decode_prompt,
    deployed_fields,
    max_positions,
    measure_speed,
)
from distill.models.footprint import disk_bytes, param_count, weight_bytes
from distill.run_dir import RunDir, Variant, read_quantize_records, variants

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)


class EvalError(DistillError):
    """The run folder or the held-out data cannot be evaluated."""


# --------------------------------------------------------------------------------------------
# One variant
# --------------------------------------------------------------------------------------------


def check_held_out(blocks: torch.Tensor, batch_size: int) -> None:
    """Check that the held-out ``blocks`` ``(N, T)`` can be scored in batches of ``batch_size``.

    Raises:
        EvalError: ``blocks`` is not ``(N >= 1, T >= 2)`` token ids, or ``batch_size < 1``.
    """
    problem = blocks_problem(blocks, batch_size)
    if problem:
        raise EvalError(
            f"held-out data: {problem} (a block needs >= 2 tokens: lower data.block_size "
            "or add text)"
        )


def evaluate_variant(
    name: str,
    model: PreTrainedModel,
    blocks: torch.Tensor,
    teacher_logits_batches: Sequence[torch.Tensor] | None,
    cfg: EvalConfig,
    folder: Path | None = None,
    *,
    memory: PeakMemory | None = None,
    collect: list[torch.Tensor] | None = None,
    fidelity: Fidelity | None = None,
) -> dict[str, Any]:
    """Quality, footprint and speed of one loaded model: one row of the report.

    Args:
        name: variant name written in the report.
        blocks: ``(N, T)`` int64 held-out blocks (already cut to ``cfg.max_blocks``).
        teacher_logits_batches: the teacher's ``(b, T, V)`` log-probs per batch of
            ``cfg.batch_size`` blocks, in order; ``None`` when ``model`` is the teacher
            (KL is then 0 and agreement 1 by construction). See
            :func:`distill.evaluate.metrics.score_blocks`.
        folder: the folder the model was loaded from (for ``disk_bytes``), if any.
        memory: a :class:`PeakMemory` the caller started before loading the model; without
            it the peak covers this evaluation only and excludes loading.
        collect: receives the model's own fp32 log-probs ``(b, T, V)`` per batch, on the
            CPU (how the teacher's reference is built in its own pass); they are excluded
            from the peak.
        fidelity: the fidelity sets to score the model on too (its row's ``fidelity``),
            after the peak-memory window.

    Raises:
        EvalError: ``blocks`` holds no block of at least 2 tokens.
        ValueError: the teacher batches do not line up with ``blocks``.
    """
    check_held_out(blocks, cfg.batch_size)
    own_memory = memory is None
    tracker = PeakMemory(model_device(model)).start() if memory is None else memory

    def keep(log_probs: torch.Tensor) -> None:
        assert collect is not None
        kept = log_probs.cpu()
        collect.append(kept)
        tracker.exclude(kept.numel() * kept.element_size())

    try:
        model.eval()
        with torch.inference_mode():
            sums = score_blocks(
                model,
                blocks,
                cfg.batch_size,
                teacher_logits_batches,
                on_log_probs=keep if collect is not None else None,
                desc=f"eval {name}",
            )
            speed = measure_speed(model, blocks, cfg)
    finally:
        peak = tracker.stop()  # also ends the sampling thread when scoring raised
    method = tracker.method + (" (evaluation only, loading excluded)" if own_memory else "")
    loaded_bytes = weight_bytes(model)
    # After the peak-memory window, as the compiled decode: the peak stays the held-out pass's.
    scored = fidelity.score_model(name, model) if fidelity is not None else None
    # After the peak-memory window: compiling holds packed copies of the weights.
    prompt = decode_prompt(blocks.reshape(1, -1), cfg, max_positions(model.config))
    compiled = compiled_decode_fields(name, model, prompt, cfg)
    row = {
        "name": name,
        "params": param_count(model),
        "weight_bytes": loaded_bytes,
        "disk_bytes": (disk_bytes(folder) or None) if folder is not None else None,
        "peak_memory_bytes": peak,
        "peak_memory_method": method,
        **quality_fields(sums),
        **speed,
        # What one decode step reads: the weights as held in memory, and K/V per cached token.
        "loaded_weight_bytes": loaded_bytes,
        "kv_cache_bytes_per_token": kv_cache_bytes_per_token(model.config, kv_dtype_bytes(model)),
        "device": str(model_device(model)),
        "folder": str(folder) if folder is not None else None,
        **compiled,
    }
    if scored is not None:
        row["fidelity"] = scored
    return {**row, **deployed_fields(row)}


# --------------------------------------------------------------------------------------------
# The saved variants of a run
# --------------------------------------------------------------------------------------------


def saved_variants(cfg: PipelineConfig, run_dir: Path) -> list[Variant]:
    """The saved variants of ``run_dir`` to evaluate, in report order; missing ones logged.

    Raises:
        EvalError: ``final/`` is missing.
    """
    rd = RunDir(run_dir)
    if not (rd.final / "config.json").exists():
        raise EvalError(
            f"{rd.final} holds no distilled model: run scripts/distill.py first, or pass "
            "run_dir=<a run with final/>"
        )
    present, missing = variants(run_dir, cfg.quant.methods, cfg.quant.gguf)
    for path in missing:
        if path == rd.student_init:
            log.warning("%s/student_init is missing: not evaluated", run_dir)
        else:
            log.warning("%s is missing: run scripts/quantize.py to evaluate it", path)
    return present


def load_variant(folder: Path, device: torch.device) -> PreTrainedModel:
    """A saved model folder as a user would load it, on ``device``, in eval mode."""
    from distill.models.conv1d import load_causal_lm

    # Plain from_pretrained, as a user would: the quantized folders carry their own
    # quantization_config, and safetensors only (no pickle). Folders storing GPT-2's Conv1D
    # as Linear take the one loader that can read them. GGUF files run in llama.cpp instead.
    model = load_causal_lm(folder, use_safetensors=True)
    if model_device(model) != device:
        # Only when it must move: torchao 0.18's unpacked int4 tensor casts its fp16 scales and
        # zero points to fp32 on any .to(), even to the device it is on (+7% bytes measured).
        model = model.to(device)
    return model.eval()


def evaluate_saved(
    variant: Variant,
    blocks: torch.Tensor,
    reference: Sequence[torch.Tensor],
    cfg: EvalConfig,
    device: torch.device,
    records: dict[str, dict[str, Any]],
    student_config: Any = None,
    fidelity: Fidelity | None = None,
) -> dict[str, Any]:
    """Evaluate one saved variant: its report row (with its ``fidelity`` sets, when given).

    A model folder is loaded inside its peak-memory window and evaluated in PyTorch on
    ``device``; a GGUF file runs in llama.cpp (:func:`distill.evaluate.gguf_runtime.gguf_row`,
    ``student_config`` giving its context limit and KV size). ``records`` are the quantize
    records by method; a quantized row carries its record's skipped modules, quant type,
    embedding choice and parity figures.
    """
    if variant.is_gguf:
        row = gguf_row(variant.name, variant.path, blocks, reference, cfg, student_config, fidelity)
    else:
        memory = PeakMemory(device).start()
        try:
            model = load_variant(variant.path, device)
        except Exception:
            memory.stop()
            raise
        row = evaluate_variant(
            variant.name,
            model,
            blocks,
            reference,
            cfg,
            variant.path,
            memory=memory,
            fidelity=fidelity,
        )
    if variant.record_key is not None:
        record = records.get(variant.record_key, {})
        row["skipped_modules"] = record.get("skipped_modules")
        row["quant_type"] = record.get("quant_type")
        row["include_embeddings"] = record.get("include_embeddings")
        row["parity"] = record.get("parity")
    return row  # a loaded model is freed here; the next window's start() collects it


def teacher_gguf_path(
    cfg: PipelineConfig,
    teacher: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    run_dir: Path,
) -> tuple[Path | None, str | None]:
    """The teacher's cached GGUF F16 (:func:`distill.evaluate.gguf_runtime.teacher_gguf`), or
    None and why not: llama.cpp is missing (no export for nothing), or the teacher cannot be
    written as GGUF. Never raises for those: the other rows still stand."""
    from distill.models.llama_cpp import llama_cpp_problem
    from distill.quantize.gguf import GGUFExportError

    problem = llama_cpp_problem()
    if problem:
        return None, problem
    tokenizer = run_tokenizer(tokenizer, run_dir)
    try:
        return teacher_gguf(teacher, tokenizer, cache_root(cfg)), None
    except GGUFExportError as err:
        log.warning("%s not measured: %s", TEACHER_ROW, err)
        return None, f"the teacher cannot be written as GGUF: {err}"


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


def run_tokenizer(
    tokenizer: PreTrainedTokenizerBase | None, run_dir: Path
) -> PreTrainedTokenizerBase:
    """``tokenizer``, else the one saved with ``final/``: the student's tokenizer is the
    teacher's (same vocabulary)."""
    if tokenizer is not None:
        return tokenizer
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(RunDir(run_dir).final)


def teacher_and_blocks(
    cfg: PipelineConfig,
    teacher: PreTrainedModel | None,
    tokenizer: PreTrainedTokenizerBase | None,
    val_blocks: torch.Tensor | None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None, torch.Tensor]:
    """The teacher (loaded from ``cfg.pair.teacher`` unless given; on CUDA when available),
    its tokenizer (None when neither given nor loaded here) and the first ``eval.max_blocks``
    held-out blocks ``(N, T)`` (prepared unless given)."""
    if teacher is None:
        from distill.models.load import load_teacher

        teacher, loaded_tokenizer = load_teacher(cfg.pair.teacher, cache_root(cfg))
        tokenizer = tokenizer if tokenizer is not None else loaded_tokenizer
        if torch.cuda.is_available():
            teacher = teacher.to("cuda")
    if val_blocks is None:
        from distill.data import prepare_data

        assert tokenizer is not None
        val_blocks = prepare_data(cfg.data, tokenizer, cache_root(cfg)).val
    blocks = val_blocks if cfg.eval.max_blocks is None else val_blocks[: cfg.eval.max_blocks]
    return teacher, tokenizer, blocks


def evaluate_teacher(
    teacher: PreTrainedModel, blocks: torch.Tensor, cfg: EvalConfig, reference: list[torch.Tensor]
) -> dict[str, Any]:
    """The teacher's row; its log-probs per batch are appended to ``reference``."""
    # The teacher is already resident (the data preparation needed its tokenizer), so its
    # window starts after loading and its resident weights are added instead.
    memory = PeakMemory(model_device(teacher)).start()
    row = evaluate_variant("teacher", teacher, blocks, None, cfg, memory=memory, collect=reference)
    row["peak_memory_bytes"] += row["weight_bytes"]
    row["peak_memory_method"] += " + resident weight_bytes (teacher loaded before the window)"
    return row


def _student_config(run_dir: Path) -> Any:
    """The Hugging Face config of ``final/``: the model the student GGUF files hold."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(RunDir(run_dir).final)


def _llama_cpp_machine(cfg: EvalConfig) -> dict[str, Any]:
    """The llama.cpp runtime GGUF rows ran in, for ``report.json``'s machine section."""
    from distill.models.llama_cpp import default_threads, llama_cpp_problem, runtime_name

    problem = llama_cpp_problem()
    return {
        "runtime": None if problem else runtime_name(),
        "threads": cfg.llama_cpp_threads or default_threads(),
        "problem": problem,
    }


@contextmanager
def _log_time(name: str) -> Iterator[None]:
    """Logs how long one row's evaluation took (where the stage's minutes go)."""
    started = time.perf_counter()
    yield
    log.info("%s evaluated in %.0f s", name, time.perf_counter() - started)


def run(
    cfg: PipelineConfig,
    run_dir: Path,
    *,
    teacher: PreTrainedModel | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    val_blocks: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Evaluate every variant of ``run_dir`` and write the report files there.

    ``teacher``, ``tokenizer`` and ``val_blocks`` (``(N, T)`` int64) may be passed by a
    caller that already holds them; otherwise the teacher is loaded from ``cfg.pair.teacher``
    and the blocks from ``cfg.data``. Saved variants are loaded one at a time and freed after
    their row is written. Every model folder runs on the teacher's device (CUDA when available
    for a teacher loaded here); GGUF files run in llama.cpp on the CPU. The teacher's
    ``peak_memory_bytes`` is its evaluation growth plus its resident weight bytes, since it
    is loaded before its window opens.

    Every row also has a ``fidelity`` dict keyed by set name (:mod:`distill.evaluate.fidelity`:
    the teacher's own text, each extra corpus, the teacher's NLL of the row's greedy answers),
    and the report's ``fidelity`` says what each set is. While the ``generation`` set is on the
    teacher stays loaded to the end, to score every variant's answers.

    Returns:
        ``{"variants": [row, ...], "fidelity": {set: description}, "training": ...,
        "machine": ..., "config": <resolved config>}``, also in ``report.json``.

    Raises:
        EvalError: ``final/`` is missing or there are no held-out blocks.
        ValueError: ``teacher`` given with neither ``tokenizer`` nor ``val_blocks``.
    """
    run_dir = Path(run_dir)
    saved = saved_variants(cfg, run_dir)  # fail before any model loads
    check_extra_corpora(cfg.eval)
    if teacher is not None and tokenizer is None and val_blocks is None:
        raise ValueError("a teacher was passed without its tokenizer or val_blocks: pass one")
    teacher, tokenizer, blocks = teacher_and_blocks(cfg, teacher, tokenizer, val_blocks)
    device = model_device(teacher)
    inputs = None
    if cfg.eval.fidelity or cfg.eval.extra_corpora:
        tokenizer = run_tokenizer(tokenizer, run_dir)
        inputs = fidelity_inputs(cfg, tokenizer)  # prompts and extra blocks, before any pass
    reference: list[torch.Tensor] = []
    fidelity = None
    with _log_time("teacher"):
        rows = [evaluate_teacher(teacher, blocks, cfg.eval, reference)]
        if inputs is not None:
            assert tokenizer is not None
            # Holds the teacher while the generation set is on: it scores every variant's
            # answers.
            fidelity = build_fidelity(inputs, cfg, teacher, tokenizer)
            rows[0]["fidelity"] = fidelity.teacher_row
    # The teacher's GGUF is exported while the teacher is loaded, and run after it is freed.
    gguf_rows = any(v.is_gguf for v in saved)
    llama_cpp: dict[str, Any] = {"teacher_gguf": None, "teacher_gguf_error": None}
    if gguf_rows and cfg.eval.teacher_gguf:
        path, llama_cpp["teacher_gguf_error"] = teacher_gguf_path(cfg, teacher, tokenizer, run_dir)
        llama_cpp["teacher_gguf"] = str(path) if path is not None else None
    teacher_config = teacher.config
    del teacher  # frees a teacher loaded here; a caller's own reference keeps theirs alive
    records = read_quantize_records(run_dir)
    student_config = _student_config(run_dir) if gguf_rows else None
    for v in saved:
        with _log_time(v.name):
            rows.append(
                evaluate_saved(
                    v, blocks, reference, cfg.eval, device, records, student_config, fidelity
                )
            )
    if llama_cpp["teacher_gguf"] is not None:
        path = Path(llama_cpp["teacher_gguf"])
        with _log_time(TEACHER_ROW):
            rows.append(
                gguf_row(TEACHER_ROW, path, blocks, reference, cfg.eval, teacher_config, fidelity)
            )
    del reference
    sets = fidelity.describe() if fidelity is not None else {}
    if fidelity is not None:
        fidelity.release()  # the sets' teacher log-probs, and the teacher it held
    for row in rows:
        row["weight_bytes_ratio_to_teacher"] = row["weight_bytes"] / rows[0]["weight_bytes"]
        # Stored weight bytes x 8 / parameters: 32 for fp32, ~8 for int8, 4.5 for Q4_0.
        row["bits_per_weight"] = row["weight_bytes"] * 8 / row["params"]
    bandwidth = None
    if cfg.eval.measure_bandwidth:
        # After the timed decodes, so the copy's buffers never compete with them for memory.
        bandwidth = measure_bandwidth(device=device)
        log.info("memory copy bandwidth: %.1f GB/s (read + write)", bandwidth / 1e9)
    for row in rows:
        add_memory_fields(row, cfg.eval, bandwidth)
    # How the student was trained, up front: the full config below holds the same values.
    training = {"teacher_mode": cfg.train.teacher_mode, "loss": asdict(cfg.loss)}
    machine = {
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "bandwidth_bytes_per_s": bandwidth,
        "bandwidth_method": BANDWIDTH_METHOD,
        "llama_cpp": {**_llama_cpp_machine(cfg.eval), **llama_cpp},
    }
    report = {
        "variants": rows,
        "fidelity": sets,
        "training": training,
        "machine": machine,
        "config": asdict(cfg),
    }
    write_report(report, run_dir)
    return report
