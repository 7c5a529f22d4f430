"""One report row of a model evaluated in PyTorch: quality, footprint, fidelity and speed.

Each row is measured in this order, so that no measurement disturbs another:

1. peak memory over loading the model (a saved variant) and its pass over the held-out blocks
   (:class:`distill.evaluate.memory.PeakMemory`; the window closes before anything is timed);
2. the fidelity sets (:mod:`distill.evaluate.fidelity`), a quantized embedding table
   dequantized once for them (:func:`distill.evaluate.answers.embedding_table_once`: the
   same values, checked);
3. eager prefill and decode (:mod:`distill.evaluate.speed`): diagnostics only;
4. compiled decode where ``eval.compiled_decode`` names the row
   (:mod:`distill.evaluate.compiled_decode`): the row's deployed PyTorch speed.

A torch row's headline speed (:func:`deployed_fields`) is its compiled decode; a row that was
not compiled shows no speed there (its eager figures stay in the diagnostics), since eager
batch-1 decode on CPU measures PyTorch's kernels, not what the weights allow (an eager int8
row decodes slower than fp32).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from distill.config import EvalConfig
from distill.evaluate.answers import embedding_table_once
from distill.evaluate.compiled_decode import compiled_decode_fields
from distill.evaluate.gguf_runtime import gguf_row
from distill.evaluate.memory import PeakMemory, kv_cache_bytes_per_token, kv_dtype_bytes
from distill.evaluate.speed import decode_prompt, max_positions, measure_speed
from distill.metrics import TeacherSide, model_device, quality_fields, score_blocks
from distill.models import disk_bytes, load_causal_lm, param_count, weight_bytes
from distill.run_dir import Variant

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from distill.evaluate.fidelity import Fidelity
    from distill.evaluate.tasks import Tasks

# What a torch row's deployed figures are, by how its decode was measured.
COMPILED_RUNTIME = "torch.compile"
TORCH_RUNTIME = "PyTorch"


def deployed_fields(row: dict[str, Any]) -> dict[str, Any]:
    """The speed a torch row deploys at: its compiled decode when it was measured
    (``eval.compiled_decode``), else none (its eager timings are diagnostics). Prefill is
    shown with the compiled decode only, and is the eager forward (only decode compiles).
    ``deployed_runtime`` says which, and why there is no speed when there is none."""
    compiled = row.get("decode_compiled_tokens_per_s")
    if compiled is not None:
        return {
            "runtime": COMPILED_RUNTIME,
            "deployed_decode_tokens_per_s": compiled,
            "deployed_prefill_tokens_per_s": row.get("prefill_tokens_per_s"),
            "deployed_runtime": "torch.compile decode (decode steps only, static KV cache); "
            "eager prefill",
        }
    why = (
        "torch.compile failed, see decode_compiled_error"
        if row.get("decode_compiled_error")
        else "not in eval.compiled_decode"
    )
    return {
        "runtime": TORCH_RUNTIME,
        "deployed_decode_tokens_per_s": None,
        "deployed_prefill_tokens_per_s": None,
        "deployed_runtime": f"no deployed speed measured ({why}); eager timings in the diagnostics",
    }


def evaluate_variant(
    name: str,
    model: PreTrainedModel,
    blocks: torch.Tensor,
    reference: Sequence[TeacherSide] | None,
    cfg: EvalConfig,
    folder: Path | None = None,
    *,
    memory: PeakMemory | None = None,
    collect: list[TeacherSide] | None = None,
    fidelity: Fidelity | None = None,
    timed_as: str | None = None,
    tasks: Tasks | None = None,
) -> dict[str, Any]:
    """Quality, footprint and speed of one loaded model: one row of the report.

    Args:
        name: variant name written in the report.
        blocks: ``(N, T)`` int64 held-out blocks (already cut to ``cfg.max_blocks``).
        reference: the teacher per batch of ``cfg.batch_size`` blocks, in order; ``None``
            when ``model`` is the teacher (KL is then 0 and agreement 1 by construction). See
            :func:`distill.metrics.score_blocks`.
        folder: the folder the model was loaded from (for ``disk_bytes``), if any.
        memory: a :class:`PeakMemory` the caller started before loading the model; without
            it the peak covers the held-out pass only and excludes loading.
        collect: receives the model's own :class:`~distill.metrics.TeacherSide` per batch,
            on the CPU (how the teacher's reference is built in its own pass); it is excluded
            from the peak.
        fidelity: the fidelity sets to score the model on too (its row's ``fidelity``).
        timed_as: the row that times this model's architecture and dtype already (the
            student for student_init): its eager speed is not measured a second time.
        tasks: lm-evaluation-harness tasks to score the model on too (its row's ``lm_eval``).

    Raises:
        ValueError: the teacher batches do not line up with ``blocks``.
    """
    own_memory = memory is None
    tracker = PeakMemory(model_device(model)).start() if memory is None else memory

    def keep(side: TeacherSide) -> None:
        assert collect is not None
        kept = side.to("cpu")
        collect.append(kept)
        tracker.exclude(kept.nbytes)

    try:
        model.eval()
        with torch.inference_mode():
            sums = score_blocks(
                model,
                blocks,
                cfg.batch_size,
                reference,
                on_reference=keep if collect is not None else None,
                desc=f"eval {name}",
            )
    finally:
        peak = tracker.stop()
    window = "the held-out pass" + ("" if own_memory else " and loading")
    loaded_bytes = weight_bytes(model)
    scored = None
    if fidelity is not None:  # after the peak window: the table copy is not the model's
        with embedding_table_once(model):
            scored = fidelity.score_model(name, model)
    task_scores = tasks.score_model(model) if tasks is not None else None
    if timed_as is None and cfg.eager_timing:
        speed = measure_speed(model, blocks, cfg)  # with nothing else running
    else:
        why = (
            f"the architecture and dtype of {timed_as}, timed there"
            if timed_as is not None and cfg.eager_timing
            else "eval.eager_timing is off"
        )
        speed = {
            "prefill_tokens_per_s": None,
            "decode_tokens_per_s": None,
            "decode_tokens": cfg.decode_tokens,
            "prompt_tokens": decode_prompt(blocks.reshape(1, -1), cfg, None).shape[1],
            "eager_timing": f"not timed: {why}",
        }
    prompt = decode_prompt(blocks.reshape(1, -1), cfg, max_positions(model.config))
    compiled = compiled_decode_fields(name, model, prompt, cfg)
    row = {
        "name": name,
        "params": param_count(model),
        "weight_bytes": loaded_bytes,
        "disk_bytes": (disk_bytes(folder) or None) if folder is not None else None,
        "peak_memory_bytes": peak,
        "peak_memory_method": f"{tracker.method} over {window}",
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
    if task_scores is not None:
        row["lm_eval"] = task_scores
    return {**row, **deployed_fields(row)}


def load_variant(folder: Path, device: torch.device) -> PreTrainedModel:
    """A saved model folder as a user would load it, on ``device``, in eval mode."""
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
    reference: Sequence[TeacherSide],
    cfg: EvalConfig,
    device: torch.device,
    records: dict[str, dict[str, Any]],
    student_config: Any = None,
    fidelity: Fidelity | None = None,
    tasks: Tasks | None = None,
) -> dict[str, Any]:
    """Evaluate one saved variant: its report row (with its ``fidelity`` sets and ``lm_eval``
    task scores, when given).
    ``student_init`` is not timed: it has the student's architecture and dtype (training
    changes neither), so its eager speed is the student's.

    A model folder is loaded inside its peak-memory window and evaluated in PyTorch on
    ``device``; a GGUF file runs in llama.cpp (:func:`distill.evaluate.gguf_runtime.gguf_row`,
    ``student_config`` giving its context limit and KV size). ``records`` are the quantize
    records by method; a quantized row carries its record's skipped modules, quant type,
    embedding choice and parity figures.
    """
    if variant.is_gguf:
        row = gguf_row(
            variant.name,
            variant.path,
            blocks,
            reference,
            cfg,
            student_config,
            fidelity,
            tasks=tasks,
        )
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
            timed_as="student" if variant.name == "student_init" else None,
            tasks=tasks,
        )
    if variant.record_key is not None:
        record = records.get(variant.record_key, {})
        row["skipped_modules"] = record.get("skipped_modules")
        row["quant_type"] = record.get("quant_type")
        row["include_embeddings"] = record.get("include_embeddings")
        row["parity"] = record.get("parity")
        if record.get("made_by"):  # a llama.cpp-made GGUF type: what its tensors really are
            row["made_by"] = record["made_by"]
            row["tensor_types"] = record.get("tensor_types")
            row["imatrix"] = record.get("imatrix")
    return row  # a loaded model is freed here; the next window's start() collects it


def evaluate_teacher(
    teacher: PreTrainedModel, blocks: torch.Tensor, cfg: EvalConfig, reference: list[TeacherSide]
) -> dict[str, Any]:
    """The teacher's row; its log-probs per batch are appended to ``reference``."""
    # The teacher is already resident (the data preparation needed its tokenizer), so its
    # window starts after loading and its resident weights are added instead.
    row = evaluate_variant("teacher", teacher, blocks, None, cfg, collect=reference)
    row["peak_memory_bytes"] += row["weight_bytes"]
    row["peak_memory_method"] += " + resident weight_bytes (the teacher was loaded before)"
    return row
