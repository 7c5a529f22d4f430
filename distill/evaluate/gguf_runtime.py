"""GGUF rows of the evaluate report, scored and timed in llama.cpp, the runtime they deploy to.

Each ``student-gguf-<type>`` file is opened once in llama.cpp (:func:`distill.models.open_gguf`)
and serves its whole row from that one instance:

* what the file holds: parameters and tensor bytes, as llama.cpp counts them;
* quality on the same held-out blocks as the torch rows: llama.cpp's logits, normalised once,
  scored against the torch teacher's log-probs by :func:`distill.metrics.score_positions`
  (perplexity, KL(teacher || variant), top-1); peak memory is taken over opening the file and
  this pass only;
* the fidelity sets (:mod:`distill.evaluate.fidelity`): llama.cpp's logits and its own
  greedy answers;
* speed last, with nothing else running: llama.cpp's own batch-1 prefill and greedy decode
  after the same prompts as the torch rows (:func:`distill.evaluate.speed.decode_prompt`,
  :func:`~distill.evaluate.speed.prefill_prompt`). Its KV cache is llama.cpp's default F16.

The teacher's GGUF F16, which the quantize stage exported and checked against the teacher
(:mod:`distill.quantize.teacher_gguf`), is the ``teacher-gguf-f16`` row: the llama.cpp
reference of the GGUF rows' speed, timed only (``quality=False``; its parity figures say how
its logits compare with the teacher's).

When llama.cpp cannot run a file (llama-cpp-python missing, a file it refuses), the row names
the reason in ``llama_cpp_error``, its quality is NaN (nothing scored) and its speed None;
the run goes on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from distill.config import EvalConfig
from distill.evaluate.fidelity import longest_row
from distill.evaluate.memory import PeakMemory, kv_cache_bytes_per_token
from distill.evaluate.speed import decode_prompt, max_positions, prefill_prompt
from distill.evaluate.tasks import TaskError
from distill.metrics import ScoreSums, TeacherSide, quality_fields, score_positions
from distill.models import LlamaCppError, default_threads, llama_cpp_problem, open_gguf

if TYPE_CHECKING:
    from distill.evaluate.fidelity import Fidelity
    from distill.evaluate.tasks import Tasks
    from distill.models import LlamaRuntime

log = logging.getLogger(__name__)

# llama.cpp's default K/V cache type is F16 (type_k / type_v unset).
KV_DTYPE_BYTES = 2


def score_gguf(
    runtime: LlamaRuntime, blocks: torch.Tensor, reference: Sequence[TeacherSide]
) -> ScoreSums:
    """Quality of the open GGUF file on ``blocks`` ``(N, T)`` against the teacher.

    Args:
        reference: the teacher per batch, in block order (as the evaluate stage keeps it:
            ``T - 1`` positions per block); llama.cpp's logits are cut to its vocabulary.

    Raises:
        LlamaCppError: llama.cpp cannot run the file.
        ValueError: the reference does not hold ``T - 1`` positions per block.
    """
    per_block = blocks.shape[1] - 1
    positions = sum(len(side) for side in reference)
    if positions != blocks.shape[0] * per_block:
        raise ValueError(
            f"{positions} teacher positions for blocks {tuple(blocks.shape)}: compute them "
            "on the same blocks"
        )
    sides = [
        part for side in reference for part in side.split([per_block] * (len(side) // per_block))
    ]
    total = ScoreSums()
    logits = runtime.iter_logits(blocks.tolist(), vocab_size=reference[0].vocab_size)
    for i, block_logits in enumerate(logits):
        log_probs = F.log_softmax(block_logits[:-1], dim=-1)
        total = total + score_positions(log_probs, sides[i], blocks[i, 1:])
    return total


def gguf_row(
    name: str,
    path: Path,
    blocks: torch.Tensor,
    reference: Sequence[TeacherSide],
    cfg: EvalConfig,
    config: Any,
    fidelity: Fidelity | None = None,
    *,
    quality: bool = True,
    tasks: Tasks | None = None,
) -> dict[str, Any]:
    """One report row of a GGUF file run in llama.cpp (CPU, ``eval.llama_cpp_threads``).

    Args:
        config: the Hugging Face config of the model the file holds (context limit, KV size).
        fidelity: the fidelity sets, scored and answered in llama.cpp too (the row's
            ``fidelity``; NaN, and ``fidelity_error`` named, when llama.cpp fails on them).
        quality: False times the file only (no held-out pass, no fidelity sets, no peak).
        tasks: lm-evaluation-harness tasks scored in llama.cpp too (the row's ``lm_eval``;
            with ``quality`` False as well: the teacher's file gets its task scores).

    The row has the torch rows' fields (quality, footprint, speed; ``decode_tokens_per_s`` is
    llama.cpp's) plus ``runtime``, ``llama_cpp_threads``, ``llama_cpp_error`` (None when it
    ran) and the ``deployed_*`` speed fields.
    """
    threads = cfg.llama_cpp_threads or default_threads()
    row: dict[str, Any] = {
        "name": name,
        "params": None,
        "weight_bytes": None,
        "weight_bytes_source": "GGUF tensor data, as llama.cpp holds and computes on it",
        "disk_bytes": path.stat().st_size,
        "kv_cache_bytes_per_token": kv_cache_bytes_per_token(config, KV_DTYPE_BYTES),
        "device": "cpu",
        "folder": str(path),
        "llama_cpp_threads": threads,
        "llama_cpp_threads_source": "eval.llama_cpp_threads"
        if cfg.llama_cpp_threads
        else "the cores this process may run on",
        "decode_batch_size": None,
        "decode_tokens_per_s_batch": None,
    }
    if fidelity is not None and quality:
        row["fidelity"] = fidelity.not_measured()
    problem = llama_cpp_problem()
    if problem:
        return {**row, **_file_facts(path), **_not_measured(cfg, "llama.cpp", problem)}
    flat = blocks.reshape(1, -1)
    limit = max_positions(config)
    prompt = decode_prompt(flat, cfg, limit)[0]
    prefill = prefill_prompt(flat, cfg, limit)[0]
    n_ctx = max(prefill.numel(), prompt.numel() + cfg.decode_tokens)
    if quality:
        n_ctx = max(n_ctx, blocks.shape[1], longest_row(fidelity))
    if tasks is not None:
        n_ctx = max(n_ctx, tasks.max_length(config))
    start = time.perf_counter()
    memory = PeakMemory(torch.device("cpu")).start()
    sums, peak = ScoreSums(), None
    try:
        with open_gguf(path, n_ctx=n_ctx, threads=threads) as runtime:
            row["params"] = runtime.params()
            row["weight_bytes"] = row["loaded_weight_bytes"] = runtime.tensor_bytes()
            if quality:
                sums = score_gguf(runtime, blocks, reference)
                peak = memory.stop()
            memory.stop()
            if fidelity is not None and quality:
                try:
                    row["fidelity"] = fidelity.score_gguf(name, runtime)
                except LlamaCppError as err:
                    log.warning("%s: fidelity sets not measured in llama.cpp: %s", name, err)
                    row["fidelity_error"] = str(err)
            if tasks is not None:
                try:
                    row["lm_eval"] = tasks.score_gguf(runtime, config)
                except (LlamaCppError, TaskError, ValueError) as err:
                    # The row's other figures stand; the report names why it has no scores.
                    log.warning("%s: lm-eval tasks not scored in llama.cpp: %s", name, err)
                    row["lm_eval_error"] = str(err)
            speed = runtime.speed(prompt, cfg.decode_tokens, cfg.repeats, prefill=prefill)
    except (LlamaCppError, ValueError) as err:
        memory.stop()
        log.warning("%s: not measured in llama.cpp: %s", name, err)
        return {**row, **_file_facts(path), **_not_measured(cfg, _runtime(), str(err))}
    runtime_name = speed.pop("runtime")
    speed.pop("threads")
    log.info("%s: scored and timed in %s, %.1f s", name, runtime_name, time.perf_counter() - start)
    return {
        **row,
        "peak_memory_bytes": peak,
        "peak_memory_method": f"{memory.method} while llama.cpp opened the file (mapped) and "
        "scored the held-out blocks, in process"
        if quality
        else None,
        **quality_fields(sums),
        "quality_scored": quality,
        **speed,
        "runtime": runtime_name,
        "llama_cpp_error": None,
        "deployed_decode_tokens_per_s": speed["decode_tokens_per_s"],
        "deployed_prefill_tokens_per_s": speed["prefill_tokens_per_s"],
        "deployed_runtime": f"{runtime_name}, {threads} threads "
        f"({row['llama_cpp_threads_source']}), batch 1, llama.cpp's own timings",
    }


def _file_facts(path: Path) -> dict[str, Any]:
    """Parameters and tensor bytes read from the file itself (``gguf``'s reader, seconds for
    a large vocabulary), for a row llama.cpp could not open; None where it cannot be read."""
    from gguf import GGUFReader

    try:
        tensors = GGUFReader(str(path)).tensors
    except Exception:  # the file is damaged: llama_cpp_error already says why
        return {"params": None, "weight_bytes": None, "loaded_weight_bytes": None}
    size = int(sum(int(t.n_bytes) for t in tensors))
    params = int(sum(int(t.n_elements) for t in tensors))
    return {"params": params, "weight_bytes": size, "loaded_weight_bytes": size}


def _runtime() -> str:
    from distill.models import runtime_name

    return runtime_name()


def _not_measured(cfg: EvalConfig, runtime: str, reason: str) -> dict[str, Any]:
    """The fields of a GGUF row llama.cpp could not run: the reason, no speed (None) and the
    quality of nothing scored (NaN, as :class:`ScoreSums` gives it)."""
    return {
        "peak_memory_bytes": None,
        "peak_memory_method": None,
        **quality_fields(ScoreSums()),
        "prefill_tokens_per_s": None,
        "prefill_tokens": cfg.prefill_tokens,
        "decode_tokens_per_s": None,
        "decode_tokens": cfg.decode_tokens,
        "prompt_tokens": cfg.prompt_tokens,
        "runtime": runtime,
        "llama_cpp_error": reason,
        "deployed_decode_tokens_per_s": None,
        "deployed_prefill_tokens_per_s": None,
        "deployed_runtime": f"not measured: {reason}",
    }
