"""Score every model of a run on the same held-out blocks and write the comparison.

Variants: ``teacher``, ``student_init`` (before distillation), ``student`` (``final/``),
``student-<method>`` for each quantized folder and ``student-gguf-<type>`` for each GGUF file,
as :func:`distill.run_dir.variants` lists them, then ``teacher-gguf-f16`` (the teacher's GGUF
F16 the quantize stage exported, when there are GGUF rows and ``eval.teacher_gguf``). GGUF rows
are scored and timed in llama.cpp, the runtime they deploy to
(:mod:`distill.evaluate.gguf_runtime`); the others in PyTorch (:mod:`distill.evaluate.rows`).
Quality is measured against the teacher on the first ``eval.max_blocks`` validation blocks
(:mod:`distill.metrics`):

* perplexity = exp(mean next-token cross-entropy), in nats per token before exp;
* ``kl_to_teacher`` = mean over the same positions of KL(teacher || variant), in nats;
* ``top1_agreement`` = fraction of positions where the argmax tokens agree.

Each row also carries a ``fidelity`` dict (:mod:`distill.evaluate.fidelity`): the same three
figures on the teacher's own text and on each extra corpus, and the teacher's NLL of the
variant's greedy answers to held-out prompts against its NLL of its own.

Each piece of work is done once: the teacher is the run's handle (loaded once, hashed once,
:class:`distill.models.Teacher`), its log-probabilities on the held-out blocks are computed in
its own pass and kept on the CPU in fp32 (``max_blocks * block_size * vocab * 4`` bytes, 1.6 GB
for 32 x 256 x 49152) for every other row, each GGUF file is opened once, and the teacher's
cached answers carry their own scores. A report this config already wrote for the same
``final/`` and ``quantized/`` is kept as it is (:func:`finished`). The files are written by
:mod:`distill.evaluate.report`, ``report.json`` last: it holds the stage's stamp.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from distill.caches import cache_root
from distill.config import PipelineConfig
from distill.data import PackedSplits, splits_for
from distill.errors import DistillError
from distill.evaluate.draft import llama_cpp_speeds
from distill.evaluate.extra_corpora import check_extra_corpora
from distill.evaluate.fidelity import FidelityInputs, build_fidelity, fidelity_inputs
from distill.evaluate.gguf_runtime import gguf_row
from distill.evaluate.memory import (
    BANDWIDTH_METHOD,
    add_memory_fields,
    measure_bandwidth,
)
from distill.evaluate.report import write_report
from distill.evaluate.rows import evaluate_saved, evaluate_teacher
from distill.evaluate.tasks import Tasks, tasks_for
from distill.evaluate.tasks import describe as describe_tasks
from distill.metrics import TeacherSide, blocks_problem
from distill.models import (
    LlamaCppError,
    Teacher,
    check_model_files,
    default_threads,
    llama_cpp_problem,
    runtime_name,
)
from distill.run_dir import (
    RunDir,
    Variant,
    file_identity,
    read_quantize_records,
    read_stamp,
    stamp_of,
    variants,
)
from distill.sampling import stop_ids

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

# The quantize record of the teacher's GGUF F16 and its report row (distill.quantize).
TEACHER_ROW = "teacher-gguf-f16"


class EvalError(DistillError):
    """The run folder or the held-out data cannot be evaluated."""


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
    for v in present:  # one line for a damaged weight file, before any model loads
        if not v.is_gguf:
            check_model_files(str(v.path), v.name)
    for path in missing:
        if path == rd.student_init:
            log.warning("%s/student_init is missing: not evaluated", run_dir)
        else:
            log.warning("%s is missing: run scripts/quantize.py to evaluate it", path)
    return present


def stage_stamp(cfg: PipelineConfig, run_dir: Path) -> str:
    """What the report depends on: the settings that shape any figure in it and the models
    it scored (``student_init/``, ``final/`` and the quantize stage's stamp)."""
    rd = RunDir(Path(run_dir))
    return stamp_of(
        asdict(cfg.eval),
        asdict(cfg.data),
        asdict(cfg.pair),
        asdict(cfg.quant),
        asdict(cfg.train),
        asdict(cfg.loss),
        file_identity(rd.student_init),
        file_identity(rd.final),
        read_stamp(rd.quantize_stamp),
    )


def finished(cfg: PipelineConfig, run_dir: Path) -> bool:
    """``report.json`` was written by this config for the models now in the run dir."""
    rd = RunDir(Path(run_dir))
    return read_stamp(rd.report_json) == stage_stamp(cfg, run_dir)


def _student_config(run_dir: Path) -> Any:
    """The Hugging Face config of ``final/``: the model the student GGUF files hold."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(RunDir(run_dir).final)


def student_shape(student: Any, teacher: Any) -> dict[str, Any]:
    """The student's shape beside the teacher's (``[student, teacher]`` per width), the teacher
    layers it kept, and what a budget's shape search found, from the two configs."""
    out: dict[str, Any] = {
        "num_layers": [student.num_hidden_layers, teacher.num_hidden_layers],
        "teacher_layers": getattr(student, "distill_teacher_layers", None),
        "shape_search": getattr(student, "distill_shape_search", None),
    }
    for key in ("intermediate_size", "num_key_value_heads", "hidden_size"):
        out[key] = [getattr(student, key, None), getattr(teacher, key, None)]
    return out


def _llama_cpp_machine(cfg: PipelineConfig) -> dict[str, Any]:
    """The llama.cpp runtime GGUF rows ran in, for ``report.json``'s machine section."""
    problem = llama_cpp_problem()
    return {
        "runtime": None if problem else runtime_name(),
        "threads": cfg.eval.llama_cpp_threads or default_threads(),
        "threads_source": "eval.llama_cpp_threads"
        if cfg.eval.llama_cpp_threads
        else "the cores this process may run on",
        "problem": problem,
    }


@contextmanager
def _log_time(name: str) -> Iterator[None]:
    """Logs how long one row's evaluation took (where the stage's minutes go)."""
    started = time.perf_counter()
    yield
    log.info("%s evaluated in %.0f s", name, time.perf_counter() - started)


def _teacher_gguf_row(
    records: dict[str, dict[str, Any]],
    blocks: torch.Tensor,
    reference: list[TeacherSide],
    cfg: PipelineConfig,
    teacher_config: Any,
    tasks: Tasks | None,
) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """The ``teacher-gguf-f16`` row from the file the quantize stage recorded (timed only:
    its parity against the teacher was checked there), and the machine section's note of it
    (its path, or why there is no row)."""
    record = records.get(TEACHER_ROW)
    if record is None:
        why = "the quantize stage recorded no teacher GGUF (run scripts/quantize.py again)"
        return None, {"teacher_gguf": None, "teacher_gguf_error": why}
    if not record.get("dst"):
        return None, {"teacher_gguf": None, "teacher_gguf_error": record.get("error")}
    path = Path(record["dst"])
    if not path.is_file():
        why = f"{path} is gone from the cache: run scripts/quantize.py again to export it"
        return None, {"teacher_gguf": None, "teacher_gguf_error": why}
    with _log_time(TEACHER_ROW):
        # Timed only: its logits were checked against the teacher's when it was exported.
        row = gguf_row(
            TEACHER_ROW,
            path,
            blocks,
            reference,
            cfg.eval,
            teacher_config,
            quality=False,
            tasks=tasks,
        )
    row["parity"] = record.get("parity")
    return row, {"teacher_gguf": str(path), "teacher_gguf_error": None}


def _draft_speed(
    cfg: PipelineConfig,
    rd: RunDir,
    records: dict[str, dict[str, Any]],
    teacher_gguf: str | None,
    inputs: FidelityInputs | None,
) -> dict[str, Any] | None:
    """The student's ``eval.draft_gguf`` file drafting for the teacher's F16 file in llama.cpp
    (:func:`distill.evaluate.draft.llama_cpp_speeds`), or why it was not timed; None when
    ``eval.draft_lengths`` is empty."""
    e = cfg.eval
    if not e.draft_lengths:
        return None
    threads = e.llama_cpp_threads or default_threads()
    out: dict[str, Any] = {"gguf": e.draft_gguf, "new_tokens": e.draft_tokens, "threads": threads}
    record = records.get(f"gguf-{e.draft_gguf}") or {}
    prompts = [p.tokens for p in (inputs.generation if inputs else [])][: e.draft_prompts]
    if teacher_gguf is None:
        why = "there is no teacher GGUF F16 row (eval.teacher_gguf=true and a GGUF type make it)"
    elif not record.get("dst"):
        why = f"the run has no student {e.draft_gguf} GGUF file (add {e.draft_gguf} to quant.gguf)"
    elif not prompts:
        why = "the generation set is off (eval.fidelity), and its prompts are the ones timed"
    else:
        why = llama_cpp_problem()
    if why:
        log.info("draft model not timed: %s", why)
        return out | {"error": why}
    try:
        with _log_time(f"student {e.draft_gguf} drafting for {TEACHER_ROW}"):
            timed = llama_cpp_speeds(
                teacher_gguf,
                rd.quantized / record["dst"],
                prompts,
                e.draft_tokens,
                e.draft_lengths,
                threads,
            )
    except (LlamaCppError, RuntimeError, ValueError) as err:  # the report still gets written
        log.warning("draft model not timed: %s", err)
        return out | {"error": f"llama.cpp failed: {err}"}
    return out | timed | {"error": None}


def run(
    cfg: PipelineConfig,
    run_dir: Path,
    *,
    teacher: Teacher | None = None,
    splits: PackedSplits | None = None,
) -> dict[str, Any]:
    """Evaluate every variant of ``run_dir`` and write the report files there.

    ``teacher`` is the run's handle (the pipeline hands over the one training used) and
    ``splits`` the run's packed data; each is made here when None. Saved variants are loaded
    one at a time and freed after their row is written. Every model folder runs on the
    teacher's device (CUDA when available); GGUF files run in llama.cpp on the CPU. While an
    answer set (``generation``, ``general``) is on the teacher stays loaded to the end, to
    score every variant's answers.

    Returns:
        ``{"variants": [row, ...], "fidelity": {set: description}, "training": ...,
        "machine": ..., "config": <resolved config>, "stamp": ...}``, also in ``report.json``
        (read back from it when this config's report is already there).

    Raises:
        EvalError: ``final/`` is missing or there are no held-out blocks.
    """
    import json

    run_dir = Path(run_dir)
    rd = RunDir(run_dir)
    saved = saved_variants(cfg, run_dir)  # fail before any model loads
    if finished(cfg, run_dir):
        log.info(
            "evaluate: %s is this config's report of these models; not evaluating again",
            rd.report_json,
        )
        return json.loads(rd.report_json.read_text())
    check_extra_corpora(cfg.eval)
    teacher = teacher or Teacher(cfg.pair.teacher, cache_root(cfg))
    tokenizer = teacher.tokenizer
    splits = splits_for(cfg, tokenizer, splits)
    blocks = splits.val if cfg.eval.max_blocks is None else splits.val[: cfg.eval.max_blocks]
    check_held_out(blocks, cfg.eval.batch_size)
    inputs = fidelity_inputs(cfg, tokenizer)  # prompts and extra blocks, before any pass
    model: PreTrainedModel = teacher.model
    # An unknown task fails here, before any pass; GGUF rows' answers stop where HFLM's do.
    tasks = tasks_for(cfg.eval, tokenizer, stop_ids(model))
    if torch.cuda.is_available() and model.device.type != "cuda":
        model.to("cuda")
    device = model.device
    reference: list[TeacherSide] = []
    fidelity = None
    with _log_time("teacher"):
        rows = [evaluate_teacher(model, blocks, cfg.eval, reference)]
        if tasks is not None:
            rows[0]["lm_eval"] = tasks.score_model(model)
        if inputs is not None:
            # Holds the teacher while an answer set is on: it scores every variant's answers.
            fidelity = build_fidelity(inputs, cfg, teacher)
            rows[0]["fidelity"] = fidelity.teacher_row
    teacher_config = model.config
    del model  # the handle may still hold it (the pipeline's, or the answer sets')
    records = read_quantize_records(run_dir)
    gguf = any(v.is_gguf for v in saved)
    student_config = _student_config(run_dir) if gguf else None
    for v in saved:
        with _log_time(v.name):
            rows.append(
                evaluate_saved(
                    v, blocks, reference, cfg.eval, device, records, student_config, fidelity, tasks
                )
            )
    llama_cpp: dict[str, Any] = {"teacher_gguf": None, "teacher_gguf_error": None}
    if gguf and cfg.eval.teacher_gguf:
        row, llama_cpp = _teacher_gguf_row(records, blocks, reference, cfg, teacher_config, tasks)
        rows += [row] if row is not None else []
    del reference
    sets = fidelity.describe() if fidelity is not None else {}
    if fidelity is not None:
        fidelity.release()  # the sets' teacher log-probs, and the teacher it held
    draft_speed = _draft_speed(cfg, rd, records, llama_cpp["teacher_gguf"], inputs)
    report = _assemble(cfg, rows, sets, device, llama_cpp)
    report["draft_speed"] = draft_speed
    if tasks is not None:
        report["lm_eval"] = describe_tasks(cfg.eval)
    report["student"] = student_shape(student_config or _student_config(run_dir), teacher_config)
    report["stamp"] = stage_stamp(cfg, run_dir)
    write_report(report, run_dir)
    return report


def _assemble(
    cfg: PipelineConfig,
    rows: list[dict[str, Any]],
    sets: dict[str, Any],
    device: torch.device,
    llama_cpp: dict[str, Any],
) -> dict[str, Any]:
    """The report: rows with their byte ratios and memory model, what the sets are, how the
    student was trained, the machine, and the config."""
    teacher_bytes = rows[0]["weight_bytes"]
    for row in rows:
        wb, params = row.get("weight_bytes"), row.get("params")
        row["weight_bytes_ratio_to_teacher"] = wb / teacher_bytes if wb is not None else None
        # Stored weight bytes x 8 / parameters: 32 for fp32, ~8 for int8, 4.5 for Q4_0.
        row["bits_per_weight"] = wb * 8 / params if wb is not None and params else None
    bandwidth = None
    if cfg.eval.measure_bandwidth:
        # After the timed decodes, so the copy's buffers never compete with them for memory.
        bandwidth = measure_bandwidth(device=device)
        log.info("memory copy bandwidth: %.1f GB/s (read + write)", bandwidth / 1e9)
    for row in rows:
        add_memory_fields(row, cfg.eval, bandwidth)
    return {
        "variants": rows,
        "fidelity": sets,
        # How the student was trained, up front: the full config below holds the same values.
        "training": {"teacher_mode": cfg.train.teacher_mode, "loss": asdict(cfg.loss)},
        "machine": {
            "device": str(device),
            "torch_threads": torch.get_num_threads(),
            "bandwidth_bytes_per_s": bandwidth,
            "bandwidth_method": BANDWIDTH_METHOD,
            "llama_cpp": {**_llama_cpp_machine(cfg), **llama_cpp},
        },
        "config": asdict(cfg),
    }
