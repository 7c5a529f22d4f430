"""Every path inside a run dir, the quantize record reader, the one atomic folder swap, and
the stamps that let a rerun skip a finished stage.

A run dir is what the stages hand each other: distill writes ``final/``, quantize reads it and
writes ``quantized/``, evaluate and publish read both. Spelling these paths in one place is
what lets a stage run alone on an earlier run (``scripts/evaluate.py run_dir=...``).

Each stage's outputs appear whole or not at all: a folder is built in a hidden staging
sibling and swapped in (:func:`replace_folder`), a file is renamed into place
(:func:`write_json_atomic`). A finished stage leaves a *stamp*, a hash of everything its
outputs depend on (:func:`stamp_of`); a rerun whose stamp matches skips the stage, and a
stage killed midway leaves no stamp and is redone, its hidden leftovers removed first
(:func:`clear_leftovers`).

Variants are the models a run produced, each with its report name and the key of its
``quantize.json`` record, so no reader has to recover one from the other by string surgery.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

QUANTIZE_RECORD = "quantize.json"
# The evaluate stage's report files, at the top of the run dir.
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
REPORT_PLOT = "memory_vs_quality.png"


@dataclass(frozen=True)
class RunDir:
    """The layout of one run dir; every stage reads and writes through these paths."""

    root: Path
    # Where the quantize stage writes (its staging folder while it runs); None: quantized/.
    quantized_dir: Path | None = None

    @property
    def final(self) -> Path:
        return self.root / "final"

    @property
    def student_init(self) -> Path:
        return self.root / "student_init"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def quantized(self) -> Path:
        return self.quantized_dir or self.root / "quantized"

    @property
    def quantize_record(self) -> Path:
        return self.quantized / QUANTIZE_RECORD

    @property
    def quantize_stamp(self) -> Path:
        """``quantized/COMPLETE``: the quantize stage's stamp, written last into the folder."""
        return self.quantized / "COMPLETE"

    @property
    def parity_blocks(self) -> Path:
        return self.quantized / "parity_blocks.safetensors"

    @property
    def publish(self) -> Path:
        return self.root / "publish"

    @property
    def report_json(self) -> Path:
        return self.root / REPORT_JSON

    @property
    def report_md(self) -> Path:
        return self.root / REPORT_MD

    @property
    def report_plot(self) -> Path:
        return self.root / REPORT_PLOT

    def method_folder(self, method: str) -> Path:
        """The torchao (or cast) folder of ``method``: ``quantized/<method>/``."""
        return self.quantized / method

    def gguf_file(self, gguf_type: str) -> Path:
        """The GGUF file of ``gguf_type``: ``quantized/gguf/student-<type>.gguf``."""
        return self.quantized / "gguf" / f"student-{gguf_type}.gguf"


def method_key(method: str) -> str:
    """The quantize.json ``method`` of a torchao/cast folder (its method name)."""
    return method


def gguf_key(gguf_type: str) -> str:
    """The quantize.json ``method`` of a GGUF file: ``gguf-<type>``."""
    return f"gguf-{gguf_type}"


@dataclass(frozen=True)
class Variant:
    """One model a run produced.

    Attributes:
        name: the report row (``student``, ``student-<method>``, ``student-gguf-<type>``).
        path: its folder, or for GGUF the file.
        record_key: the ``method`` of its quantize.json record; None for float folders.
        precision: the legend group (``fp32``, ``int8_weight_only``, ``gguf-q4_0``, ...).
    """

    name: str
    path: Path
    record_key: str | None
    precision: str

    @property
    def is_gguf(self) -> bool:
        return self.path.suffix == ".gguf"


def variants(
    run_dir: Path, methods: list[str], gguf_types: list[str]
) -> tuple[list[Variant], list[Path]]:
    """The variants of ``run_dir`` that exist on disk in report order, and the missing paths.

    ``student_init`` and ``student`` (``final/``) come first, then each quantized folder of
    ``methods``, then each GGUF file of ``gguf_types``.
    """
    rd = RunDir(run_dir)
    wanted = [
        Variant("student_init", rd.student_init, None, "fp32"),
        Variant("student", rd.final, None, "fp32"),
        *(Variant(f"student-{m}", rd.method_folder(m), method_key(m), m) for m in methods),
        *(
            Variant(f"student-gguf-{t}", rd.gguf_file(t), gguf_key(t), gguf_key(t))
            for t in gguf_types
        ),
    ]
    present, missing = [], []
    for v in wanted:
        exists = v.path.is_file() if v.is_gguf else (v.path / "config.json").is_file()
        (present if exists else missing).append(v if exists else v.path)
    return present, missing


def read_quantize_records(run_dir: Path) -> dict[str, dict[str, Any]]:
    """``quantized/quantize.json`` records by their ``method`` (empty when the file is absent)."""
    path = RunDir(run_dir).quantize_record
    if not path.is_file():
        return {}
    records = json.loads(path.read_text())
    return {r["method"]: r for r in records if isinstance(r, dict) and "method" in r}


def process_tag() -> str:
    """``<host>-<pid>``: names a temporary file or folder that only this process writes.

    A pid alone is not enough where ``cache_dir`` or a sweep dir is shared storage: two jobs
    on two cluster nodes can have the same pid, and would then write one temporary file.
    """
    return f"{socket.gethostname()}-{os.getpid()}"


def write_json_atomic(path: Path, value: Any) -> None:
    """Write ``value`` as JSON so a reader sees the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.tmp-{process_tag()}")
    tmp.write_text(json.dumps(value, indent=2))
    os.replace(tmp, path)


def staging_folder(dst: Path) -> Path:
    """An empty sibling of ``dst`` to build into before :func:`replace_folder`."""
    staging = dst.parent / f".staging-{dst.name}-{process_tag()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.parent.mkdir(parents=True, exist_ok=True)
    return staging


def replace_folder(staging: Path, dst: Path) -> None:
    """Move the finished ``staging`` folder to ``dst``, replacing an older ``dst`` whole.

    A directory cannot be renamed over a non-empty one, so the old copy is moved aside first
    and deleted after; a reader sees the old folder or the new one, never a half-written mix,
    and a crash in between leaves a hidden ``.old-`` folder, not a broken ``dst``.
    """
    old = dst.parent / f".old-{dst.name}-{process_tag()}"
    shutil.rmtree(old, ignore_errors=True)
    if dst.exists():
        os.replace(dst, old)
    os.replace(staging, dst)
    shutil.rmtree(old, ignore_errors=True)


def clear_leftovers(dst: Path) -> None:
    """Remove the hidden staging and moved-aside copies of ``dst`` that a killed process left
    (:func:`staging_folder`, :func:`replace_folder`); ``dst`` itself is untouched."""
    for pattern in (f".staging-{dst.name}-*", f".old-{dst.name}-*", f".{dst.name}.tmp-*"):
        for leftover in dst.parent.glob(pattern):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


def file_identity(path: Path) -> list[Any]:
    """What tells one written file from another without reading it: its name, size and
    modification time (a stage's outputs are always replaced whole, never edited)."""
    if not path.exists():
        return [path.name, None]
    if path.is_dir():
        return [path.name, sorted(file_identity(p) for p in path.iterdir() if p.is_file())]
    st = path.stat()
    return [path.name, st.st_size, st.st_mtime_ns]


def stamp_of(*parts: Any) -> str:
    """16 hex digits of everything a stage's outputs depend on (configs as dicts, the
    identities of the files it read)."""
    payload = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def read_stamp(file: Path) -> str | None:
    """The ``stamp`` a stage wrote into the JSON ``file``, or None (absent, unreadable, or
    written before stamps existed)."""
    try:
        found = json.loads(file.read_text())
    except (OSError, ValueError):
        return None
    return found.get("stamp") if isinstance(found, dict) else None
