"""Package a run as a Hugging Face model folder, with a model card, and optionally upload it.

``<run>/publish/`` holds the distilled student from ``final/`` at its root (safetensors,
config, generation config, tokenizer files), one subfolder per quantized variant
(``publish/<method>/``, loadable with ``from_pretrained(repo, subfolder=<method>)``), the GGUF
files under ``publish/gguf/``, a ``README.md`` model card (:mod:`distill.publish.card`, naming
the teacher found by :mod:`distill.publish.teacher_info`) and ``distill_metadata.json``.

Nothing here touches the network unless ``publish.repo_id`` is set.

The folder is assembled in a hidden staging sibling and swapped in whole, with the stage's
stamp in ``distill_metadata.json``: a rerun whose stamp matches keeps it (and uploads it only
if no upload of it is recorded), and a stage killed midway leaves the previous folder or none.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import torch

from distill.config import PipelineConfig
from distill.errors import DistillError
from distill.publish.card import render_card
from distill.publish.teacher_info import TeacherInfo, teacher_info
from distill.run_dir import (
    RunDir,
    clear_leftovers,
    file_identity,
    gguf_key,
    method_key,
    read_quantize_records,
    read_stamp,
    replace_folder,
    staging_folder,
    stamp_of,
    variants,
    write_json_atomic,
)

log = logging.getLogger(__name__)
# Provenance next to the weights: teacher, data, the full config, quantization records.
METADATA_FILE = "distill_metadata.json"
# In the run dir, not the published folder: which stamp was uploaded where.
UPLOAD_RECORD = "upload.json"

# Files a Hugging Face model folder needs; anything else in final/ (optimizer state,
# pickles, logs) stays out of the published folder.
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "*.tiktoken",
    "chat_template.jinja",
    "chat_template.json",
)


class PublishError(DistillError):
    """The run cannot be published as it stands."""


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch(name, p) for p in patterns)


def copy_model_files(src: Path, dst: Path, patterns: tuple[str, ...]) -> list[str]:
    """Copy the files of ``src`` matching ``patterns`` into ``dst``; return their names."""
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for f in sorted(src.iterdir()):
        if f.is_file() and _matches(f.name, patterns):
            shutil.copyfile(f, dst / f.name)
            copied.append(f.name)
        elif f.is_file():
            log.info("not publishing %s (not a model or tokenizer file)", f)
    return copied


def check_finite(folder: Path) -> None:
    """Every floating tensor of every ``*.safetensors`` under ``folder`` is finite.

    Tensors are read one at a time, so memory stays at one tensor.

    Raises:
        PublishError: naming the file, the tensor and how many values are NaN or inf.
    """
    from safetensors import safe_open

    for path in sorted(folder.rglob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                if not t.is_floating_point():
                    continue  # int8 quantized values cannot be NaN
                if t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
                    t = t.float()  # fp8 and friends lack isfinite kernels
                bad = int((~torch.isfinite(t)).sum())
                if bad:
                    raise PublishError(
                        f"{path.relative_to(folder)}: tensor {key!r} holds {bad} NaN/inf "
                        f"value(s) of {t.numel()}; refusing to publish a broken model (re-run "
                        "distillation, e.g. with a lower train.lr)"
                    )


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def upload(folder: Path, repo_id: str, private: bool) -> None:
    """Create (if needed) the Hub repo and upload ``folder`` to it.

    Raises:
        PublishError: the Hub refused (no token, no rights, no network).
    """
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            repo_type="model",
            commit_message="Upload distilled student and quantized variants",
        )
    except Exception as err:  # network, auth, permissions: one line with the fix
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PublishError(
            f"upload of {folder} to {repo_id} failed: {first} (log in with `hf auth login` "
            "or set HF_TOKEN; the folder is complete locally)"
        ) from None


def _published_variants(cfg: PipelineConfig, rd: RunDir) -> tuple[list[str], list[str]]:
    """The torchao methods and GGUF types of ``cfg.quant`` whose artifacts exist in ``rd``."""
    present, _ = variants(rd.root, list(cfg.quant.methods), list(cfg.quant.gguf))
    keys = {v.record_key for v in present}
    methods = [m for m in cfg.quant.methods if method_key(m) in keys]
    return methods, [t for t in cfg.quant.gguf if gguf_key(t) in keys]


def _assemble(rd: RunDir, staging: Path, methods: list[str], gguf_types: list[str]) -> None:
    """Copy the student, each variant folder (with the tokenizer) and each GGUF file."""
    copy_model_files(rd.final, staging, MODEL_FILES + TOKENIZER_FILES)
    for method in methods:
        sub = staging / method
        copy_model_files(rd.method_folder(method), sub, MODEL_FILES + TOKENIZER_FILES)
        # Each variant folder also loads on its own, without the root's tokenizer.
        for f in rd.final.iterdir():
            if f.is_file() and _matches(f.name, TOKENIZER_FILES) and not (sub / f.name).exists():
                shutil.copyfile(f, sub / f.name)
    # GGUF files carry their own tokenizer; publish/gguf/<file>.gguf.
    for gguf_type in gguf_types:
        src = rd.gguf_file(gguf_type)
        (staging / "gguf").mkdir(exist_ok=True)
        shutil.copyfile(src, staging / "gguf" / src.name)


def _metadata(
    cfg: PipelineConfig, teacher: TeacherInfo, records: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """``distill_metadata.json``: teacher, student, data, quantization and the full config."""
    return {
        "teacher": {
            **asdict(cfg.pair.teacher),
            "hub_id": teacher.hub_id,
            "license": teacher.license,
        },
        "student": asdict(cfg.pair.student),
        "data": asdict(cfg.data),
        "quantization": {"config": asdict(cfg.quant), "artifacts": list(records.values())},
        "config": asdict(cfg),
    }


def stage_stamp(cfg: PipelineConfig, run_dir: Path) -> str:
    """What ``publish/`` depends on: the publish and variant settings, the teacher it names,
    and the files it copies or quotes (``final/``, the quantize stamp, the report)."""
    rd = RunDir(Path(run_dir))
    return stamp_of(
        asdict(cfg.publish),
        list(cfg.quant.methods),
        list(cfg.quant.gguf),
        asdict(cfg.pair.teacher),
        file_identity(rd.final),
        read_stamp(rd.quantize_stamp),
        file_identity(rd.report_json),
    )


def finished(cfg: PipelineConfig, run_dir: Path) -> bool:
    """``publish/`` was assembled by this config from the files now in the run dir."""
    rd = RunDir(Path(run_dir))
    return read_stamp(rd.publish / METADATA_FILE) == stage_stamp(cfg, run_dir)


def _upload_once(cfg: PipelineConfig, rd: RunDir, stamp: str) -> None:
    """Upload ``publish/`` unless this stamp's upload to this repo is recorded."""
    assert cfg.publish.repo_id is not None
    done = {"repo_id": cfg.publish.repo_id, "stamp": stamp}
    record = rd.root / UPLOAD_RECORD
    if record.is_file() and _read_json(record) == done:
        log.info("publish: %s already uploaded to %s", rd.publish, cfg.publish.repo_id)
        return
    upload(rd.publish, cfg.publish.repo_id, cfg.publish.private)
    write_json_atomic(record, done)


def run(cfg: PipelineConfig, run_dir: Path) -> Path:
    """Build ``run_dir/publish/`` (replacing an older one) and upload it if configured; a
    folder this config already assembled from the same files is kept as it is.

    Returns:
        The published folder.

    Raises:
        PublishError: ``final/`` is missing or holds no safetensors, a published tensor is
            not finite, or the upload failed.
        ModelError: a ``pkg:`` teacher whose distribution or GGUF file is missing.
    """
    rd = RunDir(Path(run_dir))
    if not (rd.final / "config.json").is_file():
        raise PublishError(
            f"{rd.final} holds no distilled model: run scripts/distill.py first, or pass "
            "run_dir=<a run with final/>"
        )
    if not any(rd.final.glob("*.safetensors")):
        raise PublishError(f"{rd.final} holds no *.safetensors weights: re-run scripts/distill.py")
    stamp = stage_stamp(cfg, run_dir)
    if finished(cfg, run_dir):
        log.info("publish: %s already holds this run; not publishing again", rd.publish)
        if cfg.publish.repo_id:
            _upload_once(cfg, rd, stamp)
        return rd.publish
    clear_leftovers(rd.publish)
    methods, gguf_types = _published_variants(cfg, rd)
    published = {method_key(m) for m in methods} | {gguf_key(t) for t in gguf_types}
    records = {k: r for k, r in read_quantize_records(rd.root).items() if k in published}
    teacher = teacher_info(cfg.pair.teacher)
    report = _read_json(rd.report_json)
    student_config = _read_json(rd.final / "config.json") or {}

    staging = staging_folder(rd.publish)
    try:
        _assemble(rd, staging, methods, gguf_types)
        check_finite(staging)
        card = render_card(
            cfg,
            rd.root,
            teacher,
            student_config,
            (methods, gguf_types),
            report if isinstance(report, dict) and "variants" in report else None,
            records,
        )
        (staging / "README.md").write_text(card, encoding="utf-8")
        (staging / METADATA_FILE).write_text(
            json.dumps({**_metadata(cfg, teacher, records), "stamp": stamp}, indent=2, default=str)
        )
        replace_folder(staging, rd.publish)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info(
        "published %s (base_model=%s, variants: %s; GGUF: %s)",
        rd.publish,
        teacher.hub_id,
        methods or "none",
        gguf_types or "none",
    )
    if cfg.publish.repo_id:
        _upload_once(cfg, rd, stamp)
    return rd.publish
