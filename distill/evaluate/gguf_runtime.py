"""GGUF rows of the evaluate report, scored and timed in llama.cpp, the runtime they deploy to.

Each ``student-gguf-<type>`` file, and the teacher exported once to GGUF F16 (the
``teacher-gguf-f16`` row, cached as ``<cache>/gguf/<teacher weights hash>-f16.gguf``), runs in
llama.cpp (:mod:`distill.models.llama_cpp`) on the same held-out blocks as the torch rows. Its
logits are scored against the torch teacher's log-probs by
:func:`distill.evaluate.metrics.score_logits` (perplexity, KL(teacher || variant), top-1), and
its speed is llama.cpp's own batch-1 prefill and greedy decode after the same prompts as the
torch rows (:func:`distill.evaluate.speed.decode_prompt`, :func:`~distill.evaluate.speed.
prefill_prompt`). Its weight bytes are the file's tensor bytes, which llama.cpp computes on as
stored; its KV cache is llama.cpp's default F16.

When llama.cpp cannot run a file (llama-cpp-python missing, a file it refuses), the row keeps
what the file itself says (parameters, bytes), names the reason in ``llama_cpp_error``, and its
quality is NaN (nothing scored) and its speed None; the run goes on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from distill.config import EvalConfig
from distill.evaluate.memory import PeakMemory, kv_cache_bytes_per_token
from distill.evaluate.metrics import ScoreSums, quality_fields, score_logits
from distill.evaluate.speed import decode_prompt, max_positions, prefill_prompt

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from distill.evaluate.fidelity import Fidelity

log = logging.getLogger(__name__)

TEACHER_ROW = "teacher-gguf-f16"
# llama.cpp's default K/V cache type is F16 (type_k / type_v unset).
KV_DTYPE_BYTES = 2


def gguf_params(path: Path) -> int:
    """Weights stored in a GGUF file, in logical elements (a tied head is stored once)."""
    from gguf import GGUFReader

    return int(sum(int(t.n_elements) for t in GGUFReader(str(path)).tensors))


def teacher_gguf(
    teacher: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cache_dir: Path
) -> Path:
    """The teacher as one GGUF F16 file, exported on first use and cached by what it holds:
    the weights, the tokenizer and the writer's version.

    Returns:
        ``cache_dir/gguf/<weights>-<tokenizer>-v<writer>-f16.gguf`` (written atomically by
        :func:`distill.quantize.gguf.export_gguf`: a reader never sees half a file).

    Raises:
        GGUFExportError: the teacher's architecture or tokenizer cannot be written as GGUF.
    """
    from distill.data import tokenizer_fingerprint
    from distill.models.footprint import weights_hash
    from distill.quantize.gguf import WRITER_VERSION, check_exportable, export_gguf

    check_exportable(teacher.config)  # before hashing hundreds of MB
    key = f"{weights_hash(teacher)}-{tokenizer_fingerprint(tokenizer)}-v{WRITER_VERSION}"
    path = Path(cache_dir) / "gguf" / f"{key}-f16.gguf"
    if not path.is_file():
        start = time.perf_counter()
        export = export_gguf(teacher, tokenizer, path, "f16", name=f"teacher-{path.stem}")
        export.reference_state.clear()  # fp32 copies of every weight, not needed here
        log.info("teacher -> GGUF F16 %s (cached), %.1f s", path, time.perf_counter() - start)
    return path


def score_gguf(
    path: Path, blocks: torch.Tensor, reference: Sequence[torch.Tensor], threads: int
) -> ScoreSums:
    """Quality of a GGUF file in llama.cpp on ``blocks`` ``(N, T)`` against the teacher.

    Args:
        reference: the teacher's ``(b, T, V)`` log-probs per batch, in block order (as the
            evaluate stage keeps them); llama.cpp's logits are cut to their ``V`` columns.

    Raises:
        LlamaCppError: llama.cpp cannot load or run the file.
        ValueError: the reference does not hold one ``(T, V)`` row per block.
    """
    from distill.models.llama_cpp import iter_gguf_logits

    refs = [row for batch in reference for row in batch]  # (T, V) per block
    if len(refs) != blocks.shape[0] or refs[0].shape[0] != blocks.shape[1]:
        raise ValueError(
            f"{len(refs)} teacher rows of {tuple(refs[0].shape)} for blocks "
            f"{tuple(blocks.shape)}: compute them on the same blocks"
        )
    total = ScoreSums()
    logits = iter_gguf_logits(path, blocks, threads, vocab_size=refs[0].shape[-1])
    for i, block_logits in enumerate(logits):
        total = total + score_logits(block_logits[None], refs[i][None], blocks[i : i + 1])
    return total


def speed_gguf(
    path: Path, blocks: torch.Tensor, cfg: EvalConfig, config: Any, threads: int
) -> dict[str, Any]:
    """llama.cpp's batch-1 prefill and decode rates after the torch rows' prompts.

    The prompts come from ``blocks`` ``(N, T)`` read as one stream, cut to ``config``'s
    context limit; see :func:`distill.models.llama_cpp.gguf_speed` for what is timed.

    Raises:
        LlamaCppError: llama.cpp cannot load or run the file.
        ValueError: a prompt shorter than 2 tokens (``eval.prompt_tokens`` of 1).
    """
    from distill.models.llama_cpp import gguf_speed

    flat = blocks.reshape(1, -1)
    limit = max_positions(config)
    return gguf_speed(
        path,
        decode_prompt(flat, cfg, limit)[0],
        cfg.decode_tokens,
        cfg.repeats,
        threads,
        prefill=prefill_prompt(flat, cfg, limit)[0],
    )


def gguf_row(
    name: str,
    path: Path,
    blocks: torch.Tensor,
    reference: Sequence[torch.Tensor],
    cfg: EvalConfig,
    config: Any,
    fidelity: Fidelity | None = None,
) -> dict[str, Any]:
    """One report row of a GGUF file run in llama.cpp (CPU, ``eval.llama_cpp_threads``).

    Args:
        config: the Hugging Face config of the model the file holds (context limit, KV size).
        fidelity: the fidelity sets, scored and answered in llama.cpp too (the row's
            ``fidelity``; NaN, and ``fidelity_error`` named, when llama.cpp fails on them).

    The row has the torch rows' fields (quality, speed, footprint; ``decode_tokens_per_s`` is
    llama.cpp's) plus ``runtime``, ``llama_cpp_threads``, ``llama_cpp_error`` (None when it
    ran) and the ``deployed_*`` speed fields. Peak memory is the RSS growth of this process
    while llama.cpp loads (maps) the file, scores and times it.
    """
    from distill.models.llama_cpp import (
        LlamaCppError,
        default_threads,
        llama_cpp_problem,
        runtime_name,
    )
    from distill.quantize.gguf import gguf_tensor_bytes

    tensor_bytes = gguf_tensor_bytes(path)
    threads = cfg.llama_cpp_threads or default_threads()
    row: dict[str, Any] = {
        "name": name,
        "params": gguf_params(path),
        "weight_bytes": tensor_bytes,
        "weight_bytes_source": "GGUF file tensor data (llama.cpp computes on it as stored)",
        "disk_bytes": path.stat().st_size,
        "loaded_weight_bytes": tensor_bytes,
        "kv_cache_bytes_per_token": kv_cache_bytes_per_token(config, KV_DTYPE_BYTES),
        "device": "cpu",
        "folder": str(path),
        "llama_cpp_threads": threads,
        "decode_batch_size": None,
        "decode_tokens_per_s_batch": None,
    }
    if fidelity is not None:
        row["fidelity"] = fidelity.not_measured()
    problem = llama_cpp_problem()
    if problem:
        return {**row, **_not_measured(cfg, "llama.cpp", problem)}
    runtime = runtime_name()
    memory = PeakMemory(torch.device("cpu")).start()
    start = time.perf_counter()
    try:
        sums = score_gguf(path, blocks, reference, threads)
        speed = speed_gguf(path, blocks, cfg, config, threads)
    except (LlamaCppError, ValueError) as err:
        log.warning("%s: not measured in llama.cpp: %s", name, err)
        return {**row, **_not_measured(cfg, runtime, str(err))}
    finally:
        peak = memory.stop()
    if fidelity is not None:
        try:  # after the peak-memory window, as for the torch rows
            row["fidelity"] = fidelity.score_gguf(name, path, threads)
        except LlamaCppError as err:
            log.warning("%s: fidelity sets not measured in llama.cpp: %s", name, err)
            row["fidelity_error"] = str(err)
    log.info("%s: scored and timed in %s, %.1f s", name, runtime, time.perf_counter() - start)
    speed.pop("threads")
    return {
        **row,
        "peak_memory_bytes": peak,
        "peak_memory_method": f"{memory.method} (llama.cpp in process: mapped file + buffers)",
        **quality_fields(sums),
        **speed,
        "llama_cpp_error": None,
        "deployed_decode_tokens_per_s": speed["decode_tokens_per_s"],
        "deployed_prefill_tokens_per_s": speed["prefill_tokens_per_s"],
        "deployed_runtime": f"{runtime}, {threads} threads, batch 1 (llama.cpp's own timings)",
    }


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
