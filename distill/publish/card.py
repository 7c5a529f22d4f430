"""The model card: README.md front matter in the Hub's metadata keys, then the body.

The body says what the student is and how it was trained, how to load every published
variant, the evaluation table, what each quantized variant stores, how to reproduce the run,
and the license.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import yaml

from distill.config import PipelineConfig, StudentConfig
from distill.models import is_hub_id
from distill.publish.teacher_info import TeacherInfo
from distill.run_dir import gguf_key

_CONV1D_LOADER = "distill.models.conv1d.load_causal_lm"


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
    if cfg.data.source == "hf" and cfg.data.path and is_hub_id(cfg.data.path):
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


def _quant_notes(
    records: dict[str, dict[str, Any]], methods: list[str], gguf_types: list[str]
) -> list[str]:
    """The card's "Quantization" section: one item per variant, then loading and parity."""
    if not methods and not gguf_types:
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
    for gguf_type in gguf_types:
        r = records.get(gguf_key(gguf_type), {})
        if r.get("gguf_file"):
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
        f"`{name}` ({r['parity'].get('checked_in') or 'reloaded'}: KL to the float student "
        f"{r['parity']['kl_to_float']:.4f}, perplexity x{r['parity']['ppl_ratio_to_float']:.4f})"
        for name, r in records.items()
        if isinstance(r.get("parity"), dict) and "kl_to_float" in r["parity"]
    ]
    if checked:
        # Where each was reloaded is the record's own word: torchao folders in a fresh
        # process with plain transformers, GGUF files in llama.cpp.
        lines.append(
            "- Every variant was reloaded where it deploys and compared with the model it was "
            "written from on held-out blocks: " + ", ".join(checked) + "."
        )
    return lines


def _student_init(student: StudentConfig) -> str:
    if student.init == "from_teacher":
        depth = (
            f"initialised from teacher layers {list(student.layers)}"
            if student.layers is not None
            else f"initialised from {student.num_layers} of the teacher's layers"
        )
        cuts = [
            f"{key} {getattr(student, key)}"
            for key in ("intermediate_size", "num_key_value_heads", "hidden_size")
            if getattr(student, key) is not None
        ]
        return depth + (
            f", cut in width to {', '.join(cuts)} by activation importance" if cuts else ""
        )
    if student.init == "from_config":
        return "randomly initialised from the teacher's config with overrides"
    return f"initialised from `{student.name_or_path}`"


def _usage_lines(
    repo: str, methods: list[str], gguf_types: list[str], records: dict[str, dict[str, Any]]
) -> list[str]:
    """The "Usage" code block: the student, then one load line per published variant."""
    lines = [
        "## Usage",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'tokenizer = AutoTokenizer.from_pretrained("{repo}")',
        f'model = AutoModelForCausalLM.from_pretrained("{repo}")',
    ]
    for method in methods:
        if records.get(method, {}).get("loader") == _CONV1D_LOADER:
            # GPT-2 Conv1D stored as Linear: from_pretrained would rebuild Conv1D
            # (distill.quantize.folder).
            lines.append(
                f"model_{method} = distill.models.conv1d.load_causal_lm(<local copy of {repo}>/"
                f"{method})  # GPT-2 Conv1D stored as Linear; needs torchao and distill"
            )
            continue
        lines.append(
            f'model_{method} = AutoModelForCausalLM.from_pretrained("{repo}", '
            f'subfolder="{method}")  # needs torchao'
        )
    for gguf_type in gguf_types:
        gguf_file = records.get(gguf_key(gguf_type), {}).get("gguf_file")
        if gguf_file:
            lines.append(
                f'model_gguf_{gguf_type} = AutoModelForCausalLM.from_pretrained("{repo}", '
                f'gguf_file="gguf/{gguf_file}")  # dequantized on load'
            )
    return lines + ["```", ""]


def _evaluation_lines(report: dict[str, Any] | None, teacher_name: str) -> list[str]:
    from distill.evaluate import draft_summary, fidelity_lines, format_table, task_lines

    lines = ["## Evaluation", ""]
    if report is None:
        return lines + ["Not evaluated yet (no report.json in the run): run scripts/evaluate.py."]
    lines += [
        format_table(report),
        "",
        f"Every variant is scored on the same held-out blocks against the teacher "
        f"({teacher_name}); KL is KL(teacher || variant) in nats per token. Sizes are "
        "decimal (1 MB = 10^6 bytes); speeds are batch-size-1 medians on the machine "
        "that ran the evaluation.",
    ]
    # The same sets as report.md: the teacher's own text, extra corpora, the teacher's NLL of
    # each variant's answers (reports written before them have none, and show none).
    fidelity = fidelity_lines(report, "### Fidelity to the teacher")
    lines += ["", *fidelity] if fidelity else []
    draft = draft_summary(report)
    lines += ["", draft] if draft else []
    tasks = [line.replace("## ", "### ", 1) for line in task_lines(report)]
    return lines + ["", *tasks] if tasks else lines


def _license_lines(cfg: PipelineConfig, meta: dict[str, Any], teacher_name: str) -> list[str]:
    if not meta.get("license"):
        return []
    inherited = (
        "as set for this release."
        if cfg.publish.license
        else f"inherited from the teacher ({teacher_name})."
    )
    return ["## License", "", f"`{meta['license']}`, " + inherited, ""]


def render_card(
    cfg: PipelineConfig,
    run_dir: Path,
    teacher: TeacherInfo,
    student_config: dict[str, Any],
    variants: tuple[list[str], list[str]],
    report: dict[str, Any] | None,
    records: dict[str, dict[str, Any]],
) -> str:
    """The full README.md: YAML front matter, then the card body in markdown.

    Args:
        student_config: the published student's ``config.json``.
        variants: the published torchao methods and GGUF types.
        report: ``report.json`` of the evaluate stage, None when the run was not evaluated.
        records: quantize.json records of the published variants, by record key.
    """
    from distill.evaluate import model_index

    methods, gguf_types = variants
    meta = card_metadata(cfg, teacher, student_config.get("model_type"), methods)
    # The student's lm-evaluation-harness scores, where the Hub reads evaluation results.
    index = model_index(report, cfg.publish.repo_id or f"{cfg.pair.name}-student")
    if index:
        meta["model-index"] = index
    teacher_name = teacher.hub_id or cfg.pair.teacher.name_or_path
    teacher_link = (
        f"[{teacher.hub_id}](https://huggingface.co/{teacher.hub_id})"
        if teacher.hub_id
        else f"`{cfg.pair.teacher.name_or_path}`"
    )
    student, loss = cfg.pair.student, cfg.loss
    lines = [
        "---",
        yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip(),
        "---",
        "",
        f"# {cfg.publish.repo_id or f'{cfg.pair.name} student'}",
        "",
        f"A {student_config.get('num_hidden_layers', '?')}-layer "
        f"{student_config.get('model_type', 'causal LM')} student distilled from "
        f"{teacher_link} ({student.init}: {_student_init(student)}). Trained for "
        f"{cfg.train.max_steps} steps with loss `(1 - {loss.kd_ratio}) * CE + {loss.kd_ratio} * "
        f"KL` (`{loss.name}`, temperature {loss.temperature}) on `{cfg.data.source}` text in "
        f"blocks of {cfg.data.block_size} tokens.",
        "",
        f"Teacher id source: {teacher.evidence}.",
        "",
        *_usage_lines(cfg.publish.repo_id or "path/to/publish", methods, gguf_types, records),
        *_evaluation_lines(report, teacher_name),
        "",
        "## Quantization",
        "",
        *_quant_notes(records, methods, gguf_types),
        "",
        "## Reproduce",
        "",
        "```bash",
        reproduce_command(run_dir),
        "```",
        "",
        *_license_lines(cfg, meta, teacher_name),
    ]
    return "\n".join(lines)
