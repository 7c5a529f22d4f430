"""The schema's sections, one dataclass per Hydra config group (pair, data, loss, train,
quant, eval, publish), each with ``problems()``: every invalid field phrased with the value it
has and the values it may take. Fields are described where their defaults are set
(``configs/<group>/*.yaml``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill.extra_corpus import ExtraCorpus
from distill.names import (
    CALIBRATIONS,
    COMPUTE_DTYPES,
    DATA_SOURCES,
    FIDELITY_SETS,
    GGUF_TYPES,
    HIDDEN_LOSSES,
    LLAMA_QUANT_TYPES,
    LOSSES,
    MIXED_PRECISION,
    QAD_GRIDS,
    QUANT_METHODS,
    SELECT_CHECKPOINT,
    TEACHER_MODES,
    TEACHER_PLACEMENTS,
)

# --------------------------------------------------------------------------------------------
# The checks every section repeats, each phrased once
# --------------------------------------------------------------------------------------------


def _at_least(
    section: str, obj: Any, names: Sequence[str], minimum: int = 1, fix: str = ""
) -> list[str]:
    return [
        f"{section}.{n}={getattr(obj, n)}: must be >= {minimum}{fix}"
        for n in names
        if getattr(obj, n) < minimum
    ]


def _in_unit(section: str, obj: Any, names: Sequence[str]) -> list[str]:
    """Fields that must lie in [0, 1] (a NaN fails too)."""
    return [
        f"{section}.{n}={getattr(obj, n)}: must be in [0, 1]"
        for n in names
        if not 0.0 <= getattr(obj, n) <= 1.0
    ]


def _choice(key: str, value: Any, choices: Sequence[str]) -> list[str]:
    return [] if value in choices else [f"{key}={value!r}: choose one of {', '.join(choices)}"]


def _listed(key: str, values: Sequence[str], choices: Sequence[str], what: str) -> list[str]:
    """A list field: unknown entries, and an entry given twice."""
    out = []
    bad = [v for v in values if v not in choices]
    if bad:
        out.append(f"{key} has unknown {bad}: choose from {', '.join(choices)}")
    if len(set(values)) != len(values):
        out.append(f"{key}={list(values)} lists a {what} twice")
    return out


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    # pydoc (CPython's documentation, offline), text_files (``paths``: .txt/.md one document
    # per file, .json/.jsonl/.parquet one per record) or hf (datasets.load_dataset).
    source: str = "pydoc"
    paths: list[str] = field(default_factory=list)
    path: str | None = None
    name: str | None = None
    split: str = "train"
    data_files: list[str] | None = None
    text_column: str = "text"
    block_size: int = 256
    val_fraction: float = 0.1
    # Documents are assigned to train/val by a hash of (split_seed, document id).
    split_seed: int = 0
    max_documents: int | None = None
    # Sequence-level KD: this share of the training blocks is the teacher's own text after
    # prompts from the training documents (distill/teacher_text.py, configs/data/*.yaml),
    # cached under cache_dir/teacher_text/ or ``generated_dir``.
    teacher_generated_fraction: float = 0.0
    generated_prompts: int = 128
    generated_tokens: int = 128
    generated_chat_share: float = 0.5
    generated_prompt_tokens: int = 64
    # 1.0 samples the teacher's own distribution; 0 is greedy (repetitive on a small model).
    generated_temperature: float = 1.0
    generated_batch_size: int = 16
    generated_dir: str | None = None
    # This share of the prompts is questions the teacher writes itself (an instruct teacher,
    # from its chat template's user prefix: distill/teacher_text.py teacher_questions).
    generated_own_share: float = 0.0

    def problems(self) -> list[str]:
        out = []
        if not 0.0 <= self.teacher_generated_fraction <= 1.0:
            out.append(
                f"data.teacher_generated_fraction={self.teacher_generated_fraction}: must be "
                "in [0, 1] (0: corpus only, 1: teacher-generated text only)"
            )
        counts = ("generated_prompts", "generated_tokens", "generated_prompt_tokens")
        out += _at_least("data", self, (*counts, "generated_batch_size"))
        out += _in_unit("data", self, ("generated_chat_share", "generated_own_share"))
        if self.generated_temperature < 0:
            out.append(
                f"data.generated_temperature={self.generated_temperature}: must be >= 0 (0: greedy)"
            )
        out += _choice("data.source", self.source, DATA_SOURCES)
        if self.source == "text_files" and not self.paths:
            out.append("data=text_files needs data.paths=[file_or_glob,...]")
        if self.source == "hf" and not self.path:
            out.append("data=hf needs data.path (a datasets name or folder)")
        out += _at_least("data", self, ("block_size",), 2)
        if not 0.0 < self.val_fraction < 1.0:
            out.append(f"data.val_fraction={self.val_fraction}: must be in (0, 1)")
        if self.max_documents is not None and self.max_documents < 2:
            out.append(f"data.max_documents={self.max_documents}: must be >= 2 or null")
        return out


@dataclass
class LossConfig:
    name: str = "forward_kl"
    # loss = (1 - kd_ratio) * ce + kd_ratio * kd
    kd_ratio: float = 0.5
    # Applied to teacher and student logits alike.
    temperature: float = 1.0
    # Multiply the KD term by T^2 so its gradient scale does not shrink as T grows (Hinton).
    scale_by_t2: bool = True
    # jsd: 0 = forward KL, 1 = reverse KL, between: generalized JSD (distill/train/losses.py).
    beta: float = 0.5
    # skew_kl: KL(p_t || alpha p_t + (1 - alpha) p_s); 0 = forward KL.
    alpha: float = 0.1
    # Positions per chunk of the memory-bounded loss (128 x 49,152 fp32 = 24 MiB at once);
    # null: the plain, unchunked form.
    chunk_size: int | None = 128
    # Hidden-state matching: loss gains hidden_weight x the distance (cosine or mse) of each
    # student layer's output to its teacher layer's, averaged over layers
    # (distill/train/hidden_states.py).
    hidden_weight: float = 0.0
    hidden_loss: str = "cosine"

    def problems(self) -> list[str]:
        out = _choice("loss.name", self.name, LOSSES)
        out += _in_unit("loss", self, ("kd_ratio", "beta"))
        if not self.temperature > 0.0:
            out.append(f"loss.temperature={self.temperature}: must be > 0")
        if not 0.0 <= self.alpha < 1.0:
            out.append(f"loss.alpha={self.alpha}: must be in [0, 1)")
        if self.chunk_size is not None and self.chunk_size < 1:
            out.append(f"loss.chunk_size={self.chunk_size}: must be >= 1 or null")
        if not self.hidden_weight >= 0.0:
            out.append(f"loss.hidden_weight={self.hidden_weight}: must be >= 0")
        return out + _choice("loss.hidden_loss", self.hidden_loss, HIDDEN_LOSSES)


@dataclass
class TrainConfig:
    max_steps: int = 100
    batch_size: int = 8
    grad_accum_steps: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    eval_every_n_steps: int = 50
    # Val blocks used by periodic evaluation during training (the eval stage uses all).
    eval_max_blocks: int = 16
    save_every_n_steps: int = 50
    keep_last_n_checkpoints: int = 2
    # online: the teacher runs every step; cached: its top-k log-probabilities (plus one
    # bucket for the rest) come from a cache built once (distill/train/teacher_cache.py), in
    # cache_root/teacher_logits/<key> or teacher_cache_dir (its manifest must match the run).
    teacher_mode: str = "online"
    teacher_top_k: int = 64
    teacher_cache_dir: str | None = None
    # "auto": continue from the newest complete checkpoint in the run dir (fresh if none), so
    # a pipeline killed mid-training resumes on rerun; null: start fresh, ignoring
    # checkpoints; or the path of one checkpoint folder.
    resume: str | None = "auto"
    mixed_precision: str = "no"
    # Where the frozen teacher lives under FSDP / DeepSpeed ZeRO-3: a full copy per device
    # (replicate: fastest when it fits) or sharded like the student (shard; refused before
    # any weights load when the launch shards nothing).
    teacher_placement: str = "replicate"
    log_every_n_steps: int = 1
    # last: final/ is the last step. best_quantized: each kept checkpoint is quantized with
    # quant.methods[0] and the one with the best held-out perplexity becomes final/.
    select_checkpoint: str = "last"
    # On-policy distillation (GKD's lambda): this share of micro-batches are the student's
    # own samples after the block's first sample_prompt_tokens tokens, scored by the online
    # teacher (distill/train/on_policy.py).
    on_policy_fraction: float = 0.0
    sample_temperature: float = 1.0
    sample_tokens: int = 64
    sample_prompt_tokens: int = 64
    # Quantization-aware distillation (distill/train/qad.py): the last qad_steps of max_steps
    # train through rounding onto this GGUF grid (q4_0, q8_0; null: off).
    qad: str | None = None
    qad_steps: int = 0

    def problems(self) -> list[str]:
        out = _at_least(
            "train",
            self,
            (
                "max_steps",
                "batch_size",
                "grad_accum_steps",
                "eval_every_n_steps",
                "save_every_n_steps",
                "keep_last_n_checkpoints",
                "log_every_n_steps",
                "eval_max_blocks",
                "teacher_top_k",
                "sample_tokens",
                "sample_prompt_tokens",
            ),
        )
        out += _at_least("train", self, ("warmup_steps",), 0)
        if not self.lr > 0:
            out.append(f"train.lr={self.lr}: must be > 0")
        out += _in_unit("train", self, ("min_lr_ratio", "on_policy_fraction"))
        if self.weight_decay < 0:
            out.append(f"train.weight_decay={self.weight_decay}: must be >= 0")
        if not self.max_grad_norm > 0:
            out.append(f"train.max_grad_norm={self.max_grad_norm}: must be > 0")
        out += _choice("train.teacher_mode", self.teacher_mode, TEACHER_MODES)
        out += _choice("train.select_checkpoint", self.select_checkpoint, SELECT_CHECKPOINT)
        out += _choice("train.teacher_placement", self.teacher_placement, TEACHER_PLACEMENTS)
        out += _choice("train.mixed_precision", self.mixed_precision, MIXED_PRECISION)
        if self.qad is not None:
            out += _choice("train.qad", self.qad, QAD_GRIDS)
            if not 1 <= self.qad_steps <= self.max_steps:
                out.append(
                    f"train.qad_steps={self.qad_steps}: train.qad needs 1..train.max_steps "
                    f"({self.max_steps}) steps"
                )
        elif self.qad_steps:
            out.append(f"train.qad_steps={self.qad_steps}: set train.qad (q4_0, q8_0) too")
        if not self.sample_temperature >= 0.0:
            out.append(
                f"train.sample_temperature={self.sample_temperature}: must be >= 0 (0: greedy)"
            )
        return out


@dataclass
class QuantConfig:
    # Each field is described in configs/quant/default.yaml.
    methods: list[str] = field(default_factory=lambda: ["int8_weight_only", "int4_weight_only"])
    include_embeddings: bool = True
    group_size: int = 32
    gguf: list[str] = field(default_factory=lambda: ["q8_0", "q4_0"])
    # gptq (4-bit weights by GPTQ on calibration_blocks training blocks) or none (rounding).
    calibration: str = "gptq"
    calibration_blocks: int = 64
    # llama.cpp-made types (names.LLAMA_QUANT_TYPES) weigh their rounding by an importance
    # matrix of the student's activations on the calibration blocks (llama-imatrix's).
    imatrix: bool = True
    embedding_bits: int = 8
    compute_dtype: str = "float32"

    def problems(self) -> list[str]:
        out = _choice("quant.compute_dtype", self.compute_dtype, COMPUTE_DTYPES)
        out += _listed("quant.methods", self.methods, QUANT_METHODS, "method")
        if self.group_size not in (32, 64, 128, 256):
            out.append(f"quant.group_size={self.group_size}: choose one of 32, 64, 128, 256")
        out += _listed("quant.gguf", self.gguf, (*GGUF_TYPES, *LLAMA_QUANT_TYPES), "type")
        out += _choice("quant.calibration", self.calibration, CALIBRATIONS)
        out += _at_least("quant", self, ("calibration_blocks",))
        if self.embedding_bits not in (4, 8):
            out.append(f"quant.embedding_bits={self.embedding_bits}: choose 4 or 8")
        return out


@dataclass
class EvalConfig:
    # Each field is described in configs/eval/default.yaml; the fidelity sets in
    # distill/evaluate/fidelity.py.
    max_blocks: int | None = 32
    batch_size: int = 4
    prompt_tokens: int = 64
    decode_tokens: int = 32
    prefill_tokens: int = 256
    repeats: int = 3
    # Eager PyTorch prefill/decode timings: diagnostics, off by default (see the yaml).
    eager_timing: bool = False
    decode_batch_size: int = 1
    memory_context_tokens: int = 2048
    memory_batch_size: int = 1
    memory_budget_bytes: int | None = None
    measure_bandwidth: bool = True
    # Rows (names or fnmatch patterns) whose decode is also timed compiled: their deployed
    # PyTorch speed. Off by default (configs/experiment/compiled.yaml turns it on).
    compiled_decode: list[str] = field(default_factory=list)
    llama_cpp_threads: int | None = None
    # The teacher exported to GGUF F16 by the quantize stage, timed in llama.cpp.
    teacher_gguf: bool = True
    # The student's GGUF file drafting for the teacher's F16 file in llama.cpp's speculative
    # decoding, timed at each draft length ([] skips it; distill/evaluate/draft.py).
    draft_lengths: list[int] = field(default_factory=lambda: [1, 2, 4])
    draft_gguf: str = "q4_0"
    draft_prompts: int = 4
    draft_tokens: int = 48
    fidelity: list[str] = field(default_factory=lambda: list(FIDELITY_SETS))
    teacher_text_prompts: int = 32
    teacher_text_tokens: int = 96
    teacher_text_temperature: float = 1.0
    teacher_text_dir: str | None = None
    # Part of the set's identity: sampled rows depend on how they were batched and seeded.
    teacher_text_batch_size: int = 8
    generation_prompts: int = 16
    general_prompts: int = 16
    generation_tokens: int = 64
    fidelity_prompt_tokens: int = 32
    generation_batch_size: int = 32
    # Files, globs or hf:<dataset>[:<config>][@<split>][#<column>] (distill/extra_corpus.py).
    extra_corpora: list[str] = field(default_factory=list)
    extra_corpus_blocks: int = 16
    # lm-evaluation-harness tasks scored on every row (distill/evaluate/tasks.py; [] : none).
    lm_eval_tasks: list[str] = field(default_factory=list)
    lm_eval_include: list[str] = field(default_factory=list)
    lm_eval_num_fewshot: int | None = None
    lm_eval_limit: int | None = None
    lm_eval_max_length: int = 2048
    lm_eval_batch_size: int = 8

    def problems(self) -> list[str]:
        out = self._fidelity_problems()
        if self.max_blocks is not None and self.max_blocks < 1:
            out.append(f"eval.max_blocks={self.max_blocks}: must be >= 1 or null")
        if self.llama_cpp_threads is not None and self.llama_cpp_threads < 1:
            out.append(
                f"eval.llama_cpp_threads={self.llama_cpp_threads}: must be >= 1 or null "
                "(null: one per core)"
            )
        if self.memory_budget_bytes is not None and self.memory_budget_bytes < 1:
            out.append(f"eval.memory_budget_bytes={self.memory_budget_bytes}: must be >= 1 or null")
        sizes = ("batch_size", "prompt_tokens", "decode_tokens", "prefill_tokens", "repeats")
        out += _at_least(
            "eval",
            self,
            (*sizes, "decode_batch_size", "memory_context_tokens", "memory_batch_size"),
        )
        if any(not isinstance(k, int) or k < 1 for k in self.draft_lengths):
            out.append(f"eval.draft_lengths={self.draft_lengths!r}: give draft lengths >= 1")
        out += _at_least("eval", self, ("draft_prompts", "draft_tokens"))
        out += _choice("eval.draft_gguf", self.draft_gguf, (*GGUF_TYPES, *LLAMA_QUANT_TYPES))
        out += self._lm_eval_problems()
        if self.decode_batch_size > 1 and not self.eager_timing:
            out.append(
                f"eval.decode_batch_size={self.decode_batch_size}: batched decode is an eager "
                "timing; set eval.eager_timing=true too"
            )
        if self.compiled_decode and self.decode_tokens < 2:
            out.append(
                f"eval.decode_tokens={self.decode_tokens}: eval.compiled_decode needs >= 2 "
                "(the first token comes from the eager prefill)"
            )
        if any(not isinstance(p, str) or not p for p in self.compiled_decode):
            out.append(
                f"eval.compiled_decode={self.compiled_decode!r}: give variant names or patterns"
            )
        return out

    def _lm_eval_problems(self) -> list[str]:
        out = []
        if any(not isinstance(t, str) or not t for t in self.lm_eval_tasks):
            out.append(f"eval.lm_eval_tasks={self.lm_eval_tasks!r}: give lm-eval task names")
        missing = [p for p in self.lm_eval_include if not Path(p).expanduser().is_dir()]
        if missing:
            out.append(
                f"eval.lm_eval_include: {missing} not a folder (give folders of lm-eval task YAMLs)"
            )
        for key, least in (("lm_eval_num_fewshot", 0), ("lm_eval_limit", 1)):
            value = getattr(self, key)
            if value is not None and value < least:
                out.append(f"eval.{key}={value}: must be >= {least} or null")
        out += _at_least("eval", self, ("lm_eval_max_length", "lm_eval_batch_size"))
        return out

    def _fidelity_problems(self) -> list[str]:
        out = []
        unknown = [s for s in self.fidelity if s not in FIDELITY_SETS]
        if unknown:
            out.append(
                f"eval.fidelity={list(self.fidelity)!r}: {unknown} unknown; choose from "
                f"{', '.join(FIDELITY_SETS)} ([] turns them off; extra corpora come from "
                "eval.extra_corpora)"
            )
        counts = ("teacher_text_prompts", "generation_prompts", "general_prompts")
        out += _at_least(
            "eval",
            self,
            (
                *counts,
                *("teacher_text_tokens", "teacher_text_batch_size", "generation_tokens"),
                *("fidelity_prompt_tokens", "generation_batch_size", "extra_corpus_blocks"),
            ),
            fix=" (eval.fidelity=[] turns sets off)",
        )
        if self.teacher_text_temperature < 0:
            out.append(
                f"eval.teacher_text_temperature={self.teacher_text_temperature}: must be >= 0 "
                "(1.0 samples the teacher's own distribution, 0 is greedy)"
            )
        names: list[str] = []
        for entry in self.extra_corpora:
            try:
                names.append(ExtraCorpus.parse(entry).name)
            except ValueError as err:
                out.append(f"eval.extra_corpora entry {entry!r}: {err}")
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            out.append(
                f"eval.extra_corpora: two entries would both be set extra:{twice[0]}: give "
                "files with different names"
            )
        return out


@dataclass
class PublishConfig:
    # Hub repository to push to; null keeps everything local.
    repo_id: str | None = None
    private: bool = True
    license: str | None = None

    def problems(self) -> list[str]:
        return []
