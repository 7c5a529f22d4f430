"""Caches shared by runs: where they live, and the manifest-keyed folder each of them is.

Runs that would compute the same thing (a teacher's top-k logits on a corpus, the text it
writes after a prompt set) share one folder under :func:`cache_root`. Such a folder is keyed by
a *manifest*: a frozen dataclass of everything its contents depend on (teacher weights,
tokenizer, data, settings). The folder is named by the manifest's hash (:func:`manifest_key`)
and holds it as ``manifest.json``, so a folder given explicitly (``train.teacher_cache_dir``,
``eval.teacher_text_dir``) is checked against the run before it is read, and one made for
anything else is refused naming every field that differs (:class:`CacheMismatchError`).

Contents are written whole and renamed into place; ``COMPLETE`` marks a finished folder, so a
run interrupted while filling one resumes from what it had written.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distill.errors import DistillError
from distill.run_dir import process_tag

if TYPE_CHECKING:
    from distill.config import PipelineConfig

MANIFEST = "manifest.json"
COMPLETE = "COMPLETE"


def cache_root(cfg: PipelineConfig) -> Path:
    """The shared cache folder; ``DISTILL_CACHE`` in the environment wins over the config."""
    return Path(os.environ.get("DISTILL_CACHE", cfg.cache_dir)).expanduser()


class CacheError(DistillError):
    """A cache folder cannot be used."""


class CacheMismatchError(CacheError):
    """The folder was made for another teacher, tokenizer, data or settings."""

    def __init__(self, message: str, mismatched: list[str]) -> None:
        super().__init__(message)
        self.mismatched = mismatched


def manifest_key(manifest: Any) -> str:
    """16 hex digits of the manifest's content: the name of its folder."""
    payload = json.dumps(asdict(manifest), sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def manifest_differences(file: Path, expected: Any) -> tuple[list[str], str]:
    """The fields of the dataclass ``expected`` that the JSON manifest ``file`` records with
    another value, and one phrase naming each with both values (empty when they agree)."""
    found = json.loads(file.read_text())
    names = [f.name for f in fields(expected) if found.get(f.name) != getattr(expected, f.name)]
    detail = "; ".join(
        f"{name} is {found.get(name)!r} there, {getattr(expected, name)!r} here" for name in names
    )
    return names, detail


def check_manifest(path: Path, expected: Any, *, what: str, fix: str) -> None:
    """Refuse the folder ``path`` unless its manifest equals ``expected``.

    Args:
        what: the cache's name in messages ("teacher cache").
        fix: the setting that points elsewhere, named in the message.

    Raises:
        CacheError: ``path`` holds no manifest.
        CacheMismatchError: naming every field that differs, with both values.
    """
    file = path / MANIFEST
    if not file.exists():
        raise CacheError(f"{path} holds no {MANIFEST}: it is not a {what}")
    mismatched, detail = manifest_differences(file, expected)
    if mismatched:
        raise CacheMismatchError(
            f"{what} {path} was made for another teacher, data or settings ({detail}): leave "
            f"{fix} null to get a folder keyed by this run, or point it at another folder",
            mismatched,
        )


def claim(path: Path, manifest: Any, *, what: str, fix: str) -> None:
    """Make ``path`` the folder of ``manifest``: write the manifest, first writer wins, or
    check the one already there.

    Two runs sharing the cache root may fill the same folder at once: the manifest is
    hard-linked into place, which fails when another process linked its copy first, and that
    copy is then checked like any existing one (so two runs for *different* manifests in one
    explicit folder cannot overwrite each other's). Hidden names are a concurrent writer's
    temporary files, not foreign content.

    Raises:
        CacheError: the folder holds files but no manifest.
        CacheMismatchError: see :func:`check_manifest`.
    """
    path.mkdir(parents=True, exist_ok=True)
    if (path / MANIFEST).exists():
        check_manifest(path, manifest, what=what, fix=fix)
        return
    if any(not p.name.startswith(".") for p in path.iterdir()):
        # A concurrent writer may have linked its manifest (and begun writing) since the
        # check above: its folder is claimed, not foreign.
        if (path / MANIFEST).exists():
            check_manifest(path, manifest, what=what, fix=fix)
            return
        raise CacheError(
            f"{path} is not empty and holds no {MANIFEST}: give {fix} an empty or new folder"
        )
    tmp = path / f".{MANIFEST}.{process_tag()}"
    tmp.write_text(json.dumps(asdict(manifest), indent=2, sort_keys=True) + "\n")
    try:
        os.link(tmp, path / MANIFEST)
    except FileExistsError:
        check_manifest(path, manifest, what=what, fix=fix)
    finally:
        tmp.unlink()


def is_complete(path: Path) -> bool:
    return (path / COMPLETE).exists()


def mark_complete(path: Path) -> None:
    """Written last: the folder's contents are whole."""
    (path / COMPLETE).write_text("ok\n")
