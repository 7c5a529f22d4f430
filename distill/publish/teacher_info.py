"""What the teacher is: its Hub id, license and languages, from local files only.

The model card names the teacher's Hub id as ``base_model``. For a teacher given as a GGUF
file the id comes from the file's own metadata: ``general.source.*`` describe the model the
GGUF was converted from (that is the teacher), while ``general.base_model.*`` describe that
model's *parents*, so the latter are never used for the teacher's id. The embedded default GGUF
carries no URL at all, only ``general.organization`` (``HuggingFaceTB``), ``general.basename``
(``smollm2``), ``general.size_label`` and ``general.license`` (``apache-2.0``); its id is then
rebuilt as ``<organization>/<file name without the quantization suffix>``
(``HuggingFaceTB/SmolLM2-135M-Instruct``), accepted only when the file name contains the
basename.

``pkg:`` teachers are resolved by :func:`distill.models.load.find_packaged_file`, the one
resolver training uses too, and Hub ids are spelled as :func:`distill.models.load.is_hub_id`
says. Nothing here touches the network.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from distill.config import TeacherConfig
from distill.models import find_packaged_file, is_hub_id, packaged_distribution

_HF_URL = re.compile(r"^https?://(?:www\.)?huggingface\.co/([\w.-]+/[\w.-]+?)/?$")
# Quantization suffix of a GGUF file name: "Model-7B.Q4_K_M", "model-f16", "x.IQ3_XS".
_GGUF_QUANT_SUFFIX = re.compile(r"[._-](?:I?Q\d\w*|BF16|F16|F32|FP16|FP32)$", re.IGNORECASE)


def _repo_id(value: Any) -> bool:
    """A recorded value that names a Hub repository: ``owner/name``. A bare name found in
    metadata or a config is more likely a local folder's than a Hub id, so it is not taken."""
    return isinstance(value, str) and "/" in value and is_hub_id(value)


@dataclass
class TeacherInfo:
    """What the model card says about the teacher; ``None`` fields are unknown."""

    hub_id: str | None = None
    license: str | None = None
    languages: list[str] = field(default_factory=list)
    # How ``hub_id`` was found, written in the card so a reader can judge it.
    evidence: str = "unknown"


def read_gguf_general(path: Path) -> dict[str, Any]:
    """The ``general.*`` key/values of a GGUF file as Python values (strings, lists, ints)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    out: dict[str, Any] = {}
    for key, fld in reader.fields.items():
        if key.startswith("general."):
            out[key] = fld.contents()
    return out


def hub_id_from_url(url: Any) -> str | None:
    if isinstance(url, str):
        m = _HF_URL.match(url.strip())
        if m:
            return m.group(1)
    return None


def hub_id_from_gguf(general: dict[str, Any], gguf_name: str) -> tuple[str | None, str]:
    """The Hub id of the model a GGUF file holds, and how it was found.

    Args:
        general: ``general.*`` metadata of the file (see :func:`read_gguf_general`).
        gguf_name: the file's name, used when the metadata names no repository.

    Returns:
        (hub id or None, a short description of the evidence).
    """
    for key in ("general.source.huggingface.repository",):
        value = general.get(key)
        if _repo_id(value):
            return value, f"GGUF {key}"
    # Source keys describe the converted model itself; general.url / repo_url usually the
    # GGUF's own repository. Neither base_model.* (the parents) is the teacher.
    for key in ("general.source.repo_url", "general.source.url", "general.repo_url", "general.url"):
        hub_id = hub_id_from_url(general.get(key))
        if hub_id:
            return hub_id, f"GGUF {key}"
    org = general.get("general.organization")
    basename = general.get("general.basename")
    stem = _GGUF_QUANT_SUFFIX.sub("", Path(gguf_name).name.removesuffix(".gguf"))
    if isinstance(org, str) and org and re.fullmatch(r"[\w.-]+", org + stem):
        squash = re.sub(r"[^a-z0-9]", "", stem.lower())
        if not isinstance(basename, str) or re.sub(r"[^a-z0-9]", "", basename.lower()) in squash:
            return (
                f"{org}/{stem}",
                "GGUF general.organization + file name (the file records no repository URL)",
            )
    return None, "GGUF metadata names no repository"


def front_matter_of(readme: Path) -> dict[str, Any]:
    """YAML front matter of a model card, ``{}`` when absent or unreadable."""
    try:
        text = readme.read_text(encoding="utf-8")
    except OSError:
        return {}
    m = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.DOTALL)
    if not m:
        return {}
    try:
        data = yaml.safe_load(m.group(1))
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def _card_license(meta: dict[str, Any]) -> str | None:
    value = meta.get("license")
    return value if isinstance(value, str) and value else None


def _hub_id_of_folder(folder: Path) -> tuple[str | None, str]:
    # A snapshot inside the Hugging Face cache: .../models--<org>--<name>/snapshots/<sha>.
    for part in folder.resolve().parts:
        if part.startswith("models--"):
            hub_id = part.removeprefix("models--").replace("--", "/", 1)
            if _repo_id(hub_id):
                return hub_id, "Hugging Face cache folder name"
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    for key in ("_name_or_path", "_model_name_or_path"):
        value = config.get(key)
        if _repo_id(value) and not os.path.exists(value):
            return value, f"teacher config.json {key}"
    return None, "local folder records no Hub id"


def _cached_hub_file(repo_id: str, filename: str, revision: str | None) -> Path | None:
    """A file of a Hub repo already in the local cache; never downloads."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, filename, revision=revision)
    except Exception:  # malformed id or cache: the card just says less
        return None
    return Path(found) if isinstance(found, str) else None


def teacher_info(cfg: TeacherConfig) -> TeacherInfo:
    """Hub id, license and languages of the teacher, from local files only.

    Raises:
        ModelError: a ``pkg:`` teacher whose distribution or GGUF file is missing.
    """
    name = cfg.name_or_path
    dist = packaged_distribution(name)
    if dist is not None:
        if cfg.gguf_file is None:
            return TeacherInfo(evidence=f"package {dist} (no GGUF file to read metadata from)")
        return _info_from_gguf(find_packaged_file(dist, cfg.gguf_file))
    local = Path(name).expanduser()
    if local.is_dir():
        if cfg.gguf_file is not None and (local / cfg.gguf_file).is_file():
            return _info_from_gguf(local / cfg.gguf_file)
        meta = front_matter_of(local / "README.md")
        hub_id, evidence = _hub_id_of_folder(local)
        return TeacherInfo(hub_id, _card_license(meta), _languages(meta.get("language")), evidence)
    # A Hub id. Its GGUF file (when one is named) knows the original model; its card knows
    # the license. Both only if already cached.
    # Training loads this very name from the Hub, so any Hub-id spelling counts.
    info = TeacherInfo(name if is_hub_id(name) else None, evidence="pair.teacher.name_or_path")
    if cfg.gguf_file is not None:
        gguf_path = _cached_hub_file(name, cfg.gguf_file, cfg.revision)
        if gguf_path is not None:
            from_gguf = _info_from_gguf(gguf_path)
            if from_gguf.hub_id is not None:
                return from_gguf
            info.license, info.languages = from_gguf.license, from_gguf.languages
    readme = _cached_hub_file(name, "README.md", cfg.revision)
    if readme is not None:
        meta = front_matter_of(readme)
        info.license = info.license or _card_license(meta)
        info.languages = info.languages or _languages(meta.get("language"))
    return info


def _languages(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str)]
    return []


def _info_from_gguf(path: Path) -> TeacherInfo:
    general = read_gguf_general(path)
    hub_id, evidence = hub_id_from_gguf(general, path.name)
    license_ = general.get("general.license")
    return TeacherInfo(
        hub_id=hub_id,
        license=license_ if isinstance(license_, str) and license_ else None,
        languages=_languages(general.get("general.languages")),
        evidence=evidence,
    )
