"""The ``quantized/quantize.json`` records: one per artifact, built here and logged.

The file is a list of records, each keyed by ``method`` (a torchao/cast method name, or
``gguf-<type>``; :func:`distill.run_dir.method_key`, :func:`distill.run_dir.gguf_key`), whose
``dst`` is the artifact's path relative to ``quantized/``; the teacher's GGUF reference has a
record of its own (:mod:`distill.quantize.teacher_gguf`).
Readers go through :func:`distill.run_dir.read_quantize_records`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill.models import CONFIG_KEY as CONV1D_CONFIG_KEY
from distill.models import disk_bytes
from distill.quantize.plan import QuantPlan
from distill.quantize.torchao import CAST, storage_of
from distill.run_dir import gguf_key, method_key, write_json_atomic

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FolderFacts:
    """What one torchao/cast folder measured: the float source and the reloaded variant."""

    params: int
    float_weight_bytes: int
    weight_bytes: int
    tied_embeddings: bool


def folder_record(
    method: str,
    src: Path,
    dst: Path,
    *,
    model: Any,
    plan: QuantPlan,
    ao_config: Any,
    device: str,
    settings: dict[str, Any],
    facts: FolderFacts,
    seconds: float,
) -> dict[str, Any]:
    """The quantize.json record of the folder ``dst`` written from ``src`` with ``method``.

    Args:
        model: the in-memory quantized model (its dtype and config are recorded).
        settings: ``group_size``, ``calibrated`` (GPTQ groups were given), ``embedding_bits``
            and ``include_embeddings`` as :func:`distill.quantize.folder.quantize_to_folder`
            received them.
    """
    include_embeddings = settings["include_embeddings"]
    # An alias of a quantized weight (the tied LM head) computes with the quantized tensor too.
    quantized = plan.quantize + [a for a, o in plan.aliases.items() if o in plan.quantize]
    int4_cpu = method == "int4_weight_only" and device == "cpu"
    return {
        "method": method_key(method),
        "format": "torchao" if ao_config is not None else "safetensors",
        "src": str(src),
        "dst": str(dst),
        "quant_type": type(ao_config).__name__ if ao_config is not None else str(CAST[method]),
        "device": device,
        "compute_dtype": str(model.dtype).removeprefix("torch."),
        "storage": storage_of(method, device),
        "group_size": settings["group_size"] if method == "int4_weight_only" else None,
        "calibration": (("gptq" if settings["calibrated"] else "rtn") if int4_cpu else None),
        "embedding_bits": settings["embedding_bits"] if int4_cpu and include_embeddings else None,
        "include_embeddings": include_embeddings,
        "quantized_modules": quantized,
        "tied_modules": dict(plan.aliases),
        "skipped_modules": plan.skipped,
        "params": facts.params,
        "float_weight_bytes": facts.float_weight_bytes,
        "weight_bytes": facts.weight_bytes,
        "weight_bytes_ratio": facts.weight_bytes / facts.float_weight_bytes,
        "bits_per_weight": facts.weight_bytes * 8 / facts.params,
        "float_disk_bytes": disk_bytes(src),
        "disk_bytes": disk_bytes(dst),
        "tied_embeddings": facts.tied_embeddings,
        # Folders with Conv1D stored as Linear need distill's loader (distill.quantize.folder).
        "loader": "distill.models.conv1d.load_causal_lm"
        if getattr(model.config, CONV1D_CONFIG_KEY, None)
        else "transformers.AutoModelForCausalLM.from_pretrained",
        "seconds": round(seconds, 2),
    }


def gguf_record(export: Any, float_bytes: int, include_embeddings: bool, seconds: float) -> dict:
    """The quantize.json record of one GGUF file written by
    :func:`distill.quantize.gguf.export_gguf`."""
    counts: dict[str, int] = {}
    for kind in export.tensor_types.values():
        counts[kind] = counts.get(kind, 0) + 1
    return {
        "method": gguf_key(export.gguf_type),
        "format": "gguf",
        "dst": str(export.path),
        "gguf_file": export.path.name,
        "quant_type": export.gguf_type.upper(),
        "device": "cpu",
        "storage": (
            f"GGUF {export.gguf_type.upper()} 2-D weights, F32 norms; transformers dequantizes "
            "it to float on load, llama.cpp computes on it directly"
        ),
        "include_embeddings": include_embeddings,
        "tensor_types": counts,
        "f16_fallback": export.f16_fallback,
        "calibrated_tensors": export.calibrated,
        "params": export.params,
        "float_weight_bytes": float_bytes,
        # The file's tensor data: what a runtime that keeps the format holds in memory.
        "weight_bytes": export.tensor_bytes,
        "weight_bytes_source": "tensor data stored in the GGUF file (header excluded)",
        "weight_bytes_ratio": export.tensor_bytes / float_bytes,
        "bits_per_weight": export.tensor_bytes * 8 / export.params,
        "disk_bytes": export.path.stat().st_size,
        "tied_embeddings": "output.weight absent (tied)"
        if "output.weight" not in export.tensor_types
        else False,
        "seconds": round(seconds, 2),
    }


def write_records(path: Path, records: list[dict]) -> None:
    """Write ``quantize.json`` at ``path`` whole (a reader never sees a truncated summary)."""
    write_json_atomic(path, records)


def log_record(record: dict) -> None:
    """One line of sizes per artifact, plus what stayed in float or fell back to F16."""
    log.info(
        "quantize %s: %.1f MB -> %.1f MB of weights (%.1f%%, %.2f bits/weight), %.1f s",
        record["method"],
        record["float_weight_bytes"] / 1e6,
        record["weight_bytes"] / 1e6,
        100 * record["weight_bytes_ratio"],
        record["bits_per_weight"],
        record["seconds"],
    )
    by_reason: dict[str, list[str]] = {}
    for skipped in record.get("skipped_modules") or []:
        by_reason.setdefault(skipped["reason"], []).append(skipped["name"])
    for reason, names in by_reason.items():
        log.info("  kept in float: %d module(s), e.g. %s: %s", len(names), names[0], reason)
    if record.get("f16_fallback"):
        log.info("  written F16 (rows not whole 32-value blocks): %s", record["f16_fallback"])
