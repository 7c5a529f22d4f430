"""Typed configuration schema for every stage of the pipeline, and nothing else.

The dataclasses are registered in Hydra's ConfigStore as ``pipeline_schema``;
``configs/pipeline.yaml`` lists it first in its defaults so every YAML value is type-checked
against them on composition. Range checks that OmegaConf cannot express live in each
section's ``problems()`` (:mod:`distill.config.sections`, :mod:`distill.config.pair`);
``PipelineConfig.__post_init__`` gathers the problems of every section and of their
combinations and raises one :class:`~distill.errors.ConfigError` naming all of them, so a user
fixes a bad command line in one go. The values enumerated fields accept are listed in
:mod:`distill.names`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import DictConfig, OmegaConf

from distill.config.pair import WIDTH_KEYS, PairConfig, StudentConfig, TeacherConfig
from distill.config.sections import (
    DataConfig,
    EvalConfig,
    LossConfig,
    PublishConfig,
    QuantConfig,
    TrainConfig,
)
from distill.errors import ConfigError

__all__ = [
    "DataConfig",
    "EvalConfig",
    "LossConfig",
    "PairConfig",
    "PipelineConfig",
    "PublishConfig",
    "QuantConfig",
    "StudentConfig",
    "TeacherConfig",
    "TrainConfig",
    "WIDTH_KEYS",
    "register_configs",
    "to_pipeline_config",
]


@dataclass
class PipelineConfig:
    pair: PairConfig = field(default_factory=PairConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)
    # Converted teachers and tokenized corpora are cached here and shared by runs
    # (DISTILL_CACHE in the environment wins: distill.caches.cache_root).
    cache_dir: str = "~/.cache/distill"
    # Stage scripts (quantize, evaluate, publish) given a previous run dir work on it.
    run_dir: str | None = None

    def __post_init__(self) -> None:
        problems = []
        for section in (self.pair, self.data, self.loss, self.train, self.quant, self.eval):
            problems.extend(section.problems())
        problems.extend(self.publish.problems())
        if self.train.select_checkpoint == "best_quantized" and not self.quant.methods:
            problems.append(
                "train.select_checkpoint=best_quantized scores checkpoints with "
                "quant.methods[0], but quant.methods is empty: list a method or use "
                "train.select_checkpoint=last"
            )
        if self.train.qad is not None and self.train.qad not in self.quant.gguf:
            problems.append(
                f"train.qad={self.train.qad} trains the student for its {self.train.qad} GGUF "
                f"file, but quant.gguf={list(self.quant.gguf)} writes none: add "
                f"{self.train.qad} to quant.gguf or unset train.qad"
            )
        problems.extend(self._distill_signal_problems())
        if problems:
            raise ConfigError(f"{len(problems)} invalid config field(s): " + "; ".join(problems))

    def _distill_signal_problems(self) -> list[str]:
        """Combinations on-policy sampling and hidden-state matching cannot work with."""
        out = []
        tc, loss = self.train, self.loss
        if tc.on_policy_fraction > 0.0:
            if tc.teacher_mode == "cached":
                out.append(
                    f"train.on_policy_fraction={tc.on_policy_fraction} needs the online teacher "
                    "(the cache holds its view of the training blocks, not of the student's "
                    "samples): set train.teacher_mode=online or train.on_policy_fraction=0"
                )
            if loss.kd_ratio == 0.0:
                out.append(
                    f"train.on_policy_fraction={tc.on_policy_fraction} with loss.kd_ratio=0: "
                    "the student's samples are scored by the divergence alone (no CE on its "
                    "own text), so they would get no loss: raise loss.kd_ratio or set "
                    "train.on_policy_fraction=0"
                )
            if tc.sample_prompt_tokens >= self.data.block_size:
                out.append(
                    f"train.sample_prompt_tokens={tc.sample_prompt_tokens}: the prompt is the "
                    f"start of a data.block_size={self.data.block_size} block, so it must be "
                    "shorter than the block"
                )
        if loss.hidden_weight > 0.0:
            if tc.teacher_mode == "cached":
                out.append(
                    f"loss.hidden_weight={loss.hidden_weight} needs the teacher's hidden states, "
                    "which only the online teacher gives (the cache stores top-k log-probs): "
                    "set train.teacher_mode=online or loss.hidden_weight=0"
                )
            if self.pair.student.init != "from_teacher":
                out.append(
                    f"loss.hidden_weight={loss.hidden_weight} matches each student layer to the "
                    "teacher layer it was copied from; a pair.student.init="
                    f"{self.pair.student.init} student has no such layers: use "
                    "pair.student.init=from_teacher or loss.hidden_weight=0"
                )
        return out


def register_configs() -> None:
    """Register the schema so ``configs/pipeline.yaml`` can list ``pipeline_schema`` first."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="pipeline_schema", node=PipelineConfig)


def to_pipeline_config(cfg: DictConfig) -> PipelineConfig:
    """Convert a composed Hydra config into the typed, validated dataclass.

    Raises:
        ConfigError: naming every invalid or missing field.
    """
    missing = [k for k in sorted(OmegaConf.missing_keys(cfg)) if not k.startswith("hydra")]
    if missing:
        raise ConfigError(
            "missing required value(s): "
            + ", ".join(missing)
            + " (set them on the command line, e.g. "
            + f"{missing[0]}=...)"
        )
    container = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(container, dict)
    container.pop("hydra", None)
    schema = OmegaConf.structured(PipelineConfig)
    try:
        merged = OmegaConf.merge(schema, container)
    except Exception as err:  # omegaconf's own type errors: keep their message, drop the trace
        raise ConfigError(str(err).splitlines()[0]) from None
    obj = OmegaConf.to_object(merged)
    assert isinstance(obj, PipelineConfig)
    return obj
