"""The quantize stage: every variant of ``final/``, each checked in the runtime it deploys to.

``quant.methods`` become torchao (or cast) folders ``quantized/<method>/``
(:mod:`distill.quantize.folder`; what each stores: :mod:`distill.quantize.torchao`), and
``quant.gguf`` types become GGUF files ``quantized/gguf/student-<type>.gguf`` for llama.cpp
(:mod:`distill.quantize.gguf`). 4-bit weights come from GPTQ on training blocks when
``quant.calibration=gptq`` (:mod:`distill.quantize.gptq`). Every artifact is then checked
against the model it was written from (:mod:`distill.quantize.parity`): a folder reloaded by
plain transformers in a fresh process, a GGUF file run by llama.cpp (recorded as not checked
when llama-cpp-python is missing). A failed check stops the stage naming the artifact. One
record per artifact goes to ``quantized/quantize.json`` (:mod:`distill.quantize.records`),
with one more, :data:`~distill.quantize.teacher_gguf.TEACHER_GGUF`, naming the teacher's
cached GGUF F16 that the evaluate stage runs beside the student's files
(:mod:`distill.quantize.teacher_gguf`).

The whole of ``quantized/`` is built in a hidden staging folder and swapped in at the end with
its stamp (``quantized/COMPLETE``, :func:`distill.run_dir.stamp_of` of the quantize and data
settings and of ``final/``): a stage killed midway leaves no ``quantized/`` (or the previous
whole one), and a rerun whose stamp matches skips the stage.

:func:`quantize_variant` is the one mapping of ``cfg.quant`` onto a written folder: the stage
calls it for every method, and ``train.select_checkpoint=best_quantized`` calls it to score
checkpoints exactly as the shipped variant will be quantized.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill.caches import cache_root
from distill.config import PipelineConfig
from distill.data import PackedSplits, splits_for
from distill.models import Teacher, check_model_files, weight_bytes
from distill.names import LLAMA_QUANT_TYPES
from distill.quantize import parity
from distill.quantize.folder import quantize_to_folder
from distill.quantize.gptq import Int4Groups
from distill.quantize.records import gguf_record, log_record, write_records
from distill.quantize.teacher_gguf import teacher_gguf_record
from distill.quantize.torchao import QuantizeError, default_device
from distill.run_dir import (
    RunDir,
    clear_leftovers,
    file_identity,
    read_stamp,
    replace_folder,
    staging_folder,
    stamp_of,
    write_json_atomic,
)

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
    # A student trained through Q4_0 rounding (train.qad) is written by that rounding: GPTQ
    # would move its weights off the grid they were trained on.
    q4_0 = "q4_0" in gguf_types and cfg.train.qad != "q4_0"
    return ({cfg.quant.group_size} if int4_cpu else set()) | ({_Q4_0_GROUP} if q4_0 else set())


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
    train_blocks: torch.Tensor,
) -> None:
    from distill.quantize.gguf import export_gguf, reference_model

    float_bytes = weight_bytes(float_model)
    # The F16 file llama.cpp's quantizer reads, written once for every type it makes.
    source = rd.gguf_file("f16").with_name(".llama-quantize-source-f16.gguf")
    imatrix: dict | None = None
    try:
        for i, gguf_type in enumerate(cfg.quant.gguf, len(cfg.quant.methods) + 1):
            log.info("quantize %d/%d: GGUF %s of %s", i, steps, gguf_type, rd.final)
            start = time.perf_counter()
            name = f"{rd.root.name}-student-{gguf_type}"
            if gguf_type in LLAMA_QUANT_TYPES:
                if not source.exists():
                    export_gguf(float_model, tokenizer, source, "f16", name=name)
                if imatrix is None and cfg.quant.imatrix:
                    imatrix = _imatrix(cfg, float_model, train_blocks)
                export = _llama_made(cfg, rd, float_model, source, gguf_type, imatrix)
            else:
                export = export_gguf(
                    float_model,
                    tokenizer,
                    rd.gguf_file(gguf_type),
                    gguf_type,
                    include_embeddings=cfg.quant.include_embeddings,
                    name=name,
                    int4_groups=calibrated.get(_Q4_0_GROUP) if gguf_type == "q4_0" else None,
                    embedding_bits=cfg.quant.embedding_bits,
                )
            record = gguf_record(
                export, float_bytes, cfg.quant.include_embeddings, time.perf_counter() - start
            )
            if gguf_type in LLAMA_QUANT_TYPES:
                record["made_by"] = (
                    "llama.cpp's quantizer (llama_model_quantize) from distill's F16 file"
                )
                record["imatrix"] = imatrix is not None
            artifact = parity.Artifact(record["method"], export.path.parent, export.path.name)
            written.add(record, artifact, reference_model(float_model, export))
            export.reference_state.clear()
    finally:
        source.unlink(missing_ok=True)


def _imatrix(cfg: PipelineConfig, model: nn.Module, blocks: torch.Tensor) -> dict:
    """The importance matrix of ``model`` on the calibration blocks (training blocks)."""
    from distill.quantize.llama_quant import importance_matrix

    start = time.perf_counter()
    blocks = blocks[: cfg.quant.calibration_blocks]
    out = importance_matrix(model, blocks)
    log.info(
        "importance matrix: %d linear layers on %d training blocks, %.1f s",
        len(out),
        blocks.shape[0],
        time.perf_counter() - start,
    )
    return out


def _llama_made(
    cfg: PipelineConfig,
    rd: RunDir,
    model: nn.Module,
    source: Path,
    gguf_type: str,
    imatrix: dict | None,
) -> Any:
    """``gguf_type`` made from ``source`` by llama.cpp's quantizer, read back as an export."""
    from distill.models import default_threads
    from distill.quantize.gguf import read_export
    from distill.quantize.llama_quant import llama_quantize

    dst = rd.gguf_file(gguf_type)
    llama_quantize(
        source,
        dst,
        gguf_type,
        threads=cfg.eval.llama_cpp_threads or default_threads(),
        imatrix=imatrix,
        include_embeddings=cfg.quant.include_embeddings,
    )
    return read_export(model, dst, gguf_type)


def stage_stamp(cfg: PipelineConfig, run_dir: Path) -> str:
    """What ``quantized/`` depends on: the quantize settings, the data (parity and calibration
    blocks), the teacher (its GGUF reference) and the ``final/`` folder it was made from."""
    rd = RunDir(Path(run_dir))
    return stamp_of(
        asdict(cfg.quant),
        asdict(cfg.data),
        asdict(cfg.pair.teacher),
        cfg.eval.teacher_gguf,
        file_identity(rd.final),
    )


def finished(cfg: PipelineConfig, run_dir: Path) -> bool:
    """``quantized/`` holds this config's variants of the current ``final/``."""
    rd = RunDir(Path(run_dir))
    return read_stamp(rd.quantize_stamp) == stage_stamp(cfg, run_dir)


def run(
    cfg: PipelineConfig,
    run_dir: Path,
    *,
    teacher: Teacher | None = None,
    splits: PackedSplits | None = None,
) -> list[dict]:
    """Write every variant of ``run_dir/final``, check each where it deploys, summarise.

    Writes ``quantized/<method>/`` per ``cfg.quant.methods`` entry,
    ``quantized/gguf/student-<type>.gguf`` per ``cfg.quant.gguf`` entry,
    ``quantized/parity_blocks.safetensors`` (the held-out ids the parity check used) and
    ``quantized/quantize.json``: one record per artifact, each with its ``parity`` figures
    (``dst`` relative to ``quantized/``). With GGUF files and ``eval.teacher_gguf`` the
    teacher's GGUF F16 is exported (cached) too. A ``quantized/`` this config already
    finished for the current ``final/`` is kept as it is (one log line).

    Args:
        teacher: the run's teacher handle (loaded here only for its GGUF export).
        splits: the run's packed data (held-out parity blocks, training calibration blocks);
            prepared here when None.

    Raises:
        QuantizeError: ``run_dir/final`` does not exist, or a method fails as described in
            :func:`distill.quantize.folder.quantize_to_folder`.
        GGUFExportError: GGUF asked for a student llama.cpp cannot run as llama.
        ParityError: an artifact does not reproduce its model, or llama.cpp cannot load a
            GGUF file (quantize.json is written first, with the figures, in the staging
            folder; ``quantized/`` is not replaced).
    """
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from distill.quantize.gguf import check_exportable

    final = RunDir(Path(run_dir))
    if not (final.final / "config.json").is_file():
        raise QuantizeError(
            f"{final.final} holds no trained model: run scripts/distill.py first, or set run_dir "
            "to a finished run"
        )
    check_model_files(str(final.final), "student")  # one line for a damaged final/
    if finished(cfg, run_dir):
        log.info(
            "quantize: %s already holds this config's variants; not quantizing again",
            final.quantized,
        )
        return json.loads(final.quantize_record.read_text())
    if cfg.quant.gguf:
        check_exportable(AutoConfig.from_pretrained(final.final))  # before any work
    clear_leftovers(final.quantized)
    staging = staging_folder(final.quantized)
    staging.mkdir()
    rd = RunDir(final.root, quantized_dir=staging)
    tokenizer = AutoTokenizer.from_pretrained(rd.final)
    splits = splits_for(cfg, tokenizer, splits)
    ids = splits.val[: parity.PARITY_BLOCKS]
    save_file({"ids": ids.contiguous()}, str(rd.parity_blocks))
    written = _Written(ids, staging / ".parity")
    written.workdir.mkdir()

    float_model = AutoModelForCausalLM.from_pretrained(rd.final, dtype="auto").eval()
    float_logits = _logits(float_model, ids)
    calibrated = calibrate(
        cfg, float_model, splits.train, methods=cfg.quant.methods, gguf_types=cfg.quant.gguf
    )
    steps = len(cfg.quant.methods) + len(cfg.quant.gguf)
    _torchao_variants(cfg, rd, calibrated, written, steps)
    _gguf_variants(cfg, rd, float_model, tokenizer, calibrated, written, steps, splits.train)
    del float_model
    try:
        _check_parity(cfg, rd, tokenizer, written, float_logits)
    except parity.ParityError as err:
        raise parity.ParityError(
            f"{err} (quantized/ was not replaced; the artifacts and their quantize.json are "
            f"in {staging} until the next run of this stage)"
        ) from None
    finally:
        for record in written.records:  # where they will be once staging is swapped in
            record["dst"] = str(Path(record["dst"]).relative_to(staging))
        write_records(rd.quantize_record, written.records)
    if cfg.quant.gguf and cfg.eval.teacher_gguf:
        teacher = teacher or Teacher(cfg.pair.teacher, cache_root(cfg))
        written.records.append(teacher_gguf_record(teacher, cache_root(cfg), ids))
        write_records(rd.quantize_record, written.records)
    write_json_atomic(rd.quantize_stamp, {"stamp": stage_stamp(cfg, run_dir)})
    replace_folder(staging, final.quantized)
    return written.records


def _check_parity(
    cfg: PipelineConfig,
    rd: RunDir,
    tokenizer: object,
    written: _Written,
    float_logits: torch.Tensor,
) -> None:
    """Check every artifact (:func:`parity.check_artifacts`).

    Raises:
        ParityError: naming every artifact that does not reproduce its model.
    """
    # One held-out document's worth of text for the GGUF tokenizer check.
    text = tokenizer.decode(written.ids[0]) if cfg.quant.gguf else None
    source_ids = tokenizer(text)["input_ids"] if text is not None else None
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
