"""The teacher as a GGUF F16 file: the llama.cpp reference the GGUF rows are compared with.

The evaluate stage runs the student's GGUF files in llama.cpp and, beside them, the teacher in
the same runtime (the ``teacher-gguf-f16`` row, the "x teacher" of llama.cpp rows, timed only).
That file is written here, by the stage that writes every GGUF file, once per teacher and
cached by what it holds (its weights, its tokenizer and the writer's version) under
``<cache>/gguf/<key>-f16.gguf``, and checked like every GGUF file: its logits in llama.cpp
against the fp32 teacher's on the parity blocks (:func:`distill.quantize.parity.compare`,
the ``gguf-f16`` limits), the figures cached beside the file per set of blocks. The quantize
record named :data:`TEACHER_GGUF` tells the evaluate stage where it is and how it compared,
or why there is none.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from distill.data import blocks_hash, tokenizer_fingerprint
from distill.models import LlamaCppError, default_threads, llama_cpp_problem, runtime_name
from distill.quantize.gguf import WRITER_VERSION, GGUFExportError, check_exportable, export_gguf
from distill.quantize.parity import Artifact, compare, failures, limits_for, llama_cpp_logits
from distill.run_dir import write_json_atomic

if TYPE_CHECKING:
    from distill.models import Teacher

log = logging.getLogger(__name__)

# The quantize record's method, and the evaluate report's row.
TEACHER_GGUF = "teacher-gguf-f16"


def teacher_gguf(teacher: Teacher, cache_dir: Path) -> Path:
    """The teacher as one GGUF F16 file, exported on first use and cached.

    Returns:
        ``cache_dir/gguf/<weights>-<tokenizer>-v<writer>-f16.gguf`` (written atomically by
        :func:`distill.quantize.gguf.export_gguf`: a reader never sees half a file).

    Raises:
        GGUFExportError: the teacher's architecture or tokenizer cannot be written as GGUF.
    """
    check_exportable(teacher.config)  # before loading and hashing hundreds of MB
    key = f"{teacher.weights_key}-{tokenizer_fingerprint(teacher.tokenizer)}-v{WRITER_VERSION}"
    path = Path(cache_dir) / "gguf" / f"{key}-f16.gguf"
    if not path.is_file():
        start = time.perf_counter()
        export = export_gguf(
            teacher.model, teacher.tokenizer, path, "f16", name=f"teacher-{path.stem}"
        )
        export.reference_state.clear()  # fp32 copies of every weight, not needed here
        log.info("teacher -> GGUF F16 %s (cached), %.1f s", path, time.perf_counter() - start)
    return path


def teacher_gguf_parity(path: Path, teacher: Teacher, ids: torch.Tensor) -> dict[str, Any]:
    """The file's logits in llama.cpp against the fp32 teacher's on ``ids`` ``(B, T)``, judged
    by the ``gguf-f16`` limits; computed once per file and blocks, cached beside the file.

    Raises:
        LlamaCppError: llama.cpp cannot load or run the file.
    """
    cached = path.with_name(f"{path.stem}.parity-{blocks_hash(ids)}.json")
    if cached.is_file():
        return json.loads(cached.read_text())
    model = teacher.model
    with torch.inference_mode():
        logits = torch.cat(
            [
                model(input_ids=ids[i : i + 1], use_cache=False).logits.float()
                for i in range(len(ids))
            ]
        )
    # The reference is the fp32 teacher itself, so the figures include F16's rounding.
    figures: dict[str, Any] = compare(
        llama_cpp_logits(path, ids, logits.shape[-1]), logits, logits, ids
    )
    limits = limits_for(Artifact("gguf-f16", path.parent, path.name))
    problems = failures(figures, limits)
    figures.update(
        thresholds=limits,
        passed=not problems,
        problems=problems,
        checked_in=f"{runtime_name()}, in process, {default_threads()} threads, against the "
        "fp32 teacher",
    )
    write_json_atomic(cached, figures)
    return figures


def teacher_gguf_record(teacher: Teacher, cache_dir: Path, ids: torch.Tensor) -> dict[str, Any]:
    """The quantize record of the teacher's GGUF F16: its path and parity on ``ids``, or why
    there is none.

    Never raises for a teacher llama.cpp cannot take: the student's files still stand (a
    failed parity is recorded and logged). Where llama.cpp itself is missing nothing is
    exported (the file would serve no row)."""
    record: dict[str, Any] = {"method": TEACHER_GGUF, "role": "reference", "format": "gguf"}
    problem = llama_cpp_problem()
    if problem:
        return {**record, "dst": None, "error": problem}
    try:
        path = teacher_gguf(teacher, cache_dir)
        parity = teacher_gguf_parity(path, teacher, ids)
    except (GGUFExportError, LlamaCppError) as err:
        log.warning("%s not written or not run: %s", TEACHER_GGUF, err)
        return {**record, "dst": None, "error": f"the teacher as GGUF F16: {err}"}
    if not parity["passed"]:
        log.warning(
            "%s does not match the teacher: %s", TEACHER_GGUF, "; ".join(parity["problems"])
        )
    return {**record, "dst": str(path), "error": None, "parity": parity}
