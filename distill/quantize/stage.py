"""The quantize stage: every variant of ``final/``, each checked in the runtime it deploys to.

``quant.methods`` become torchao (or cast) folders ``quantized/<method>/``
(:mod:`distill.quantize.folder`; what each stores: :mod:`distill.quantize.torchao`), and
``quant.gguf`` types become GGUF files ``quantized/gguf/student-<type>.gguf`` for llama.cpp
(:mod:`distill.quantize.gguf`). 4-bit weights come from GPTQ on training blocks when
``quant.calibration=gptq`` (:mod:`distill.quantize.gptq`). Every artifact is then checked
against the model it was written from (:mod:`distill.quantize.parity`): a folder reloaded by
plain transformers in a fresh process, a GGUF file run by llama.cpp (recorded as not checked
when llama-cpp-python is missing). A failed check stops the stage naming the artifact. One
record per artifact goes to ``quantized/quantize.json`` (:mod:`distill.quantize.records`).

:func:`quantize_variant` is the one mapping of ``cfg.quant`` onto a written folder: the stage
calls it for every method, and ``train.select_checkpoint=best_quantized`` calls it to score
checkpoints exactly as the shipped variant will be quantized.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from distill.config import GGUF_TYPES, PipelineConfig, cache_root
from distill.models.footprint import weight_bytes
from distill.quantize import parity
from distill.quantize.folder import quantize_to_folder
from distill.quantize.gptq import Int4Groups
from distill.quantize.records import gguf_record, log_record, write_records
from distill.quantize.torchao import QuantizeError, default_device
from distill.run_dir import RunDir

log = logging.getLogger(__name__)

# GGUF Q4_0 blocks hold 32 values: the group size its GPTQ groups are computed at.
_Q4_0_GROUP = 32


def calibration_group_sizes(
    cfg: PipelineConfig, methods: list[str], gguf_types: list[str]
) -> set[int]:
    """Group sizes GPTQ must compute for ``methods`` and ``gguf_types`` (empty: no GPTQ).

    CPU ``int4_weight_only`` folders use ``quant.group_size``, GGUF ``q4_0`` files 32; CUDA
    int4 (tinygemm's packed layout) is not calibrated.
    """
    if cfg.quant.calibration != "gptq":
        return set()
    int4_cpu = "int4_weight_only" in methods and default_device("int4_weight_only") == "cpu"
    return ({cfg.quant.group_size} if int4_cpu else set()) | (
        {_Q4_0_GROUP} if "q4_0" in gguf_types else set()
    )


def calibrate(
    cfg: PipelineConfig,
    model: nn.Module,
    blocks: torch.Tensor | None,
    *,
    methods: list[str],
    gguf_types: list[str],
) -> dict[int, dict[str, Int4Groups]]:
    """GPTQ groups per group size for every Linear of ``model`` (not a tied LM head).

    Calibrated on the first ``quant.calibration_blocks`` of ``blocks`` (the run's *training*
    blocks ``(N, T)``, so the held-out blocks that score the variants never shape them).
    Which Linear layers are calibrated depends only on the largest group size, which is
    ``quant.group_size`` whenever int4 is asked for (it is one of 32..256), so calibrating for
    one method gives the groups the full stage gives that method.

    Returns:
        ``{group_size: {module name: groups}}``; empty when nothing is calibrated.
    """
    from distill.quantize.gptq import calibrated_int4

    group_sizes = calibration_group_sizes(cfg, methods, gguf_types)
    if not group_sizes:
        return {}
    assert blocks is not None, "GPTQ needs calibration blocks"
    names = [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear)
        and m.weight is not model.get_input_embeddings().weight  # a tied head: 8-bit or 4-bit RTN
        and m.weight.shape[1] % max(group_sizes) == 0
    ]
    blocks = blocks[: cfg.quant.calibration_blocks]
    start = time.perf_counter()
    out = calibrated_int4(model, blocks, names, group_sizes)
    log.info(
        "GPTQ: %d linear layers, group sizes %s, on %d training blocks, %.1f s",
        len(names),
        sorted(group_sizes),
        blocks.shape[0],
        time.perf_counter() - start,
    )
    return out


def quantize_variant(
    cfg: PipelineConfig,
    src: Path,
    dst: Path,
    method: str,
    calibrated: dict[int, dict[str, Int4Groups]],
) -> tuple[dict, nn.Module]:
    """Write ``method``'s folder of ``src`` to ``dst`` exactly as the stage ships it.

    Args:
        calibrated: :func:`calibrate` of the float model in ``src``.

    Returns:
        The quantize.json record and the in-memory quantized model.

    Raises:
        QuantizeError: see :func:`distill.quantize.folder.quantize_to_folder`.
    """
    return quantize_to_folder(
        src,
        dst,
        method,
        include_embeddings=cfg.quant.include_embeddings,
        group_size=cfg.quant.group_size,
        calibrated=calibrated.get(cfg.quant.group_size),
        embedding_bits=cfg.quant.embedding_bits,
        compute_dtype=cfg.quant.compute_dtype,
    )


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """``(B, T, V)`` fp32 logits on the CPU, one block at a time (bounded activations)."""
    device = next(model.parameters()).device
    with torch.inference_mode():
        rows = [
            model(input_ids=ids[i : i + 1].to(device), use_cache=False).logits.float().cpu()
            for i in range(ids.shape[0])
        ]
    return torch.cat(rows)


@dataclass
class _Written:
    """The artifacts written so far, with the in-memory reference logits parity compares to."""

    ids: torch.Tensor  # (B, T) held-out parity blocks
    workdir: Path
    records: list[dict] = field(default_factory=list)
    artifacts: list[parity.Artifact] = field(default_factory=list)
    in_memory: dict[str, Path] = field(default_factory=dict)

    def add(self, record: dict, artifact: parity.Artifact, reference: nn.Module) -> None:
        from safetensors.torch import save_file

        path = self.workdir / f"{artifact.name}-in-memory.safetensors"
        save_file({"logits": _logits(reference, self.ids).contiguous()}, str(path))
        self.in_memory[artifact.name] = path
        self.artifacts.append(artifact)
        self.records.append(record)
        log_record(record)


def _torchao_variants(
    cfg: PipelineConfig, rd: RunDir, calibrated: dict, written: _Written, steps: int
) -> None:
    for i, method in enumerate(cfg.quant.methods, 1):
        log.info("quantize %d/%d: %s on %s", i, steps, method, rd.final)
        dst = rd.method_folder(method)
        record, qmodel = quantize_variant(cfg, rd.final, dst, method, calibrated)
        written.add(record, parity.Artifact(method, dst, device=record["device"]), qmodel)


def _gguf_variants(
    cfg: PipelineConfig,
    rd: RunDir,
    float_model: nn.Module,
    tokenizer: object,
    calibrated: dict,
    written: _Written,
    steps: int,
) -> None:
    from distill.quantize.gguf import export_gguf, reference_model

    float_bytes = weight_bytes(float_model)
    for i, gguf_type in enumerate(cfg.quant.gguf, len(cfg.quant.methods) + 1):
        log.info("quantize %d/%d: GGUF %s of %s", i, steps, gguf_type, rd.final)
        start = time.perf_counter()
        export = export_gguf(
            float_model,
            tokenizer,
            rd.gguf_file(gguf_type),
            gguf_type,
            include_embeddings=cfg.quant.include_embeddings,
            name=f"{rd.root.name}-student-{gguf_type}",
            int4_groups=calibrated.get(_Q4_0_GROUP) if gguf_type == "q4_0" else None,
            embedding_bits=cfg.quant.embedding_bits,
        )
        record = gguf_record(
            export, float_bytes, cfg.quant.include_embeddings, time.perf_counter() - start
        )
        artifact = parity.Artifact(record["method"], export.path.parent, export.path.name)
        written.add(record, artifact, reference_model(float_model, export))
        export.reference_state.clear()
    for gguf_type in set(GGUF_TYPES) - set(cfg.quant.gguf):  # files of an earlier run
        rd.gguf_file(gguf_type).unlink(missing_ok=True)


def _run_blocks(
    cfg: PipelineConfig,
    tokenizer: object,
    val_blocks: torch.Tensor | None,
    calib_blocks: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Held-out and calibration blocks: as given, else the run's validation / training split."""
    from distill.data import prepare_data

    methods, gguf_types = cfg.quant.methods, cfg.quant.gguf
    needs_calibration = bool(calibration_group_sizes(cfg, methods, gguf_types))
    if val_blocks is None or (calib_blocks is None and needs_calibration):
        # One load of the run's data serves the parity check and the calibration.
        splits = prepare_data(cfg.data, tokenizer, cache_root(cfg))
        val_blocks = splits.val if val_blocks is None else val_blocks
        calib_blocks = splits.train if calib_blocks is None else calib_blocks
    return val_blocks, calib_blocks


def run(
    cfg: PipelineConfig,
    run_dir: Path,
    *,
    val_blocks: torch.Tensor | None = None,
    calib_blocks: torch.Tensor | None = None,
) -> list[dict]:
    """Write every variant of ``run_dir/final``, check each where it deploys, summarise.

    Writes ``quantized/<method>/`` per ``cfg.quant.methods`` entry,
    ``quantized/gguf/student-<type>.gguf`` per ``cfg.quant.gguf`` entry,
    ``quantized/parity_blocks.safetensors`` (the held-out ids the parity check used) and
    ``quantized/quantize.json``: one record per artifact, each with its ``parity`` figures.

    Args:
        val_blocks: held-out blocks ``(N, T)``; by default the run's validation split.
        calib_blocks: GPTQ calibration blocks ``(N, T)``; by default the run's training split.

    Raises:
        QuantizeError: ``run_dir/final`` does not exist, or a method fails as described in
            :func:`distill.quantize.folder.quantize_to_folder`.
        GGUFExportError: GGUF asked for a student llama.cpp cannot run as llama.
        ParityError: an artifact does not reproduce its model, or llama.cpp cannot load a
            GGUF file (quantize.json is written first, with the figures).
    """
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from distill.quantize.gguf import check_exportable

    rd = RunDir(Path(run_dir))
    if not (rd.final / "config.json").is_file():
        raise QuantizeError(
            f"{rd.final} holds no trained model: run scripts/distill.py first, or set run_dir "
            "to a finished run"
        )
    if cfg.quant.gguf:
        check_exportable(AutoConfig.from_pretrained(rd.final))  # before any work
    rd.quantized.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(rd.final)
    val_blocks, calib_blocks = _run_blocks(cfg, tokenizer, val_blocks, calib_blocks)
    ids = val_blocks[: parity.PARITY_BLOCKS]
    save_file({"ids": ids.contiguous()}, str(rd.parity_blocks))
    written = _Written(ids, rd.quantized / f".parity-{os.getpid()}")
    shutil.rmtree(written.workdir, ignore_errors=True)
    written.workdir.mkdir()

    float_model = AutoModelForCausalLM.from_pretrained(rd.final, dtype="auto").eval()
    float_logits = _logits(float_model, ids)
    calibrated = calibrate(
        cfg, float_model, calib_blocks, methods=cfg.quant.methods, gguf_types=cfg.quant.gguf
    )
    steps = len(cfg.quant.methods) + len(cfg.quant.gguf)
    _torchao_variants(cfg, rd, calibrated, written, steps)
    _gguf_variants(cfg, rd, float_model, tokenizer, calibrated, written, steps)
    del float_model
    _check_parity(cfg, rd, tokenizer, written, float_logits)
    return written.records


def _check_parity(
    cfg: PipelineConfig,
    rd: RunDir,
    tokenizer: object,
    written: _Written,
    float_logits: torch.Tensor,
) -> None:
    """Check every artifact (:func:`parity.check_artifacts`); write quantize.json whatever
    the verdict.

    Raises:
        ParityError: naming every artifact that does not reproduce its model.
    """
    # One held-out document's worth of text for the GGUF tokenizer check.
    text = tokenizer.decode(written.ids[0]) if cfg.quant.gguf else None
    source_ids = tokenizer(text)["input_ids"] if text is not None else None
    try:
        if not written.artifacts:  # nothing asked for: no child process to start
            shutil.rmtree(written.workdir, ignore_errors=True)
            return
        parity.check_artifacts(
            written.records,
            written.artifacts,
            written.in_memory,
            float_logits,
            written.ids,
            written.workdir,
            text=text,
            source_token_ids=source_ids,
        )
    finally:
        # Written even when parity fails, so the figures of the failed artifact can be read.
        write_records(rd.root, written.records)
