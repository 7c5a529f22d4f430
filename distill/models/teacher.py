"""The run's teacher as one handle, loaded once and hashed once, passed from stage to stage.

A pipeline run needs the teacher in three stages (training, the teacher's GGUF export, the
evaluation) and a key of its weights in several caches (its training text, its evaluation
text, its top-k logits, its GGUF file). :class:`Teacher` resolves the source once (a GGUF
teacher is converted once and cached, :func:`distill.models.load.teacher_source`), reads the
config and tokenizer without weights (for the pre-flight checks), loads the frozen fp32 model
on first use and hashes its weights on first use; every stage takes the handle instead of
loading its own copy. A stage that does not need the weights for a while (a cached-teacher
training run) calls :meth:`Teacher.release`; the next use loads them again, and the key,
which depends only on the weights, is kept.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distill.models.footprint import weights_hash
from distill.models.load import is_local, load_config, load_model, load_tokenizer, teacher_source

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

    from distill.config import TeacherConfig

log = logging.getLogger(__name__)


class Teacher:
    """The teacher of ``cfg``: source, config, tokenizer and model, each made on first use."""

    def __init__(
        self,
        cfg: TeacherConfig,
        cache_dir: Path,
        *,
        model: PreTrainedModel | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
    ) -> None:
        self.cfg = cfg
        self.cache_dir = Path(cache_dir)
        self._source: str | None = None
        self._model = model
        self._tokenizer = tokenizer
        self._config: PretrainedConfig | None = model.config if model is not None else None
        self._weights_key: str | None = None

    @classmethod
    def of(cls, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> Teacher:
        """A handle around a model already in memory (tests, benchmarks, a caller's own)."""
        from distill.config import TeacherConfig

        handle = cls(TeacherConfig(name_or_path="<in memory>"), Path("."), model=model)
        handle._tokenizer = tokenizer
        return handle

    @property
    def source(self) -> str:
        """A local folder or Hub id ``from_pretrained`` loads (a GGUF teacher converted)."""
        if self._source is None:
            self._source = teacher_source(self.cfg, self.cache_dir)
        return self._source

    def _kwargs(self) -> dict[str, Any]:
        revision = None if is_local(self.source) else self.cfg.revision
        return {"revision": revision, "trust_remote_code": self.cfg.trust_remote_code}

    @property
    def config(self) -> PretrainedConfig:
        """Its ``config.json``, read without the weights."""
        if self._config is None:
            self._config = load_config(self.source, what="teacher", **self._kwargs())
        return self._config

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.source, **self._kwargs())
        return self._tokenizer

    @property
    def loaded(self) -> bool:
        return self._model is not None

    @property
    def model(self) -> PreTrainedModel:
        """The frozen fp32 teacher (eval mode, no gradients), loaded on first use."""
        if self._model is None:
            self._model = load_model(self.source, what="teacher", **self._kwargs())
            self._config = self._model.config
        return self._model

    @property
    def weights_key(self) -> str:
        """:func:`~distill.models.footprint.weights_hash` of the weights, computed once: the
        key every cache of the teacher's outputs is filed under."""
        if self._weights_key is None:
            self._weights_key = weights_hash(self.model)
        return self._weights_key

    def release(self) -> None:
        """Drop the model (its memory is freed once no one else holds it); the source,
        config, tokenizer and weights key stay."""
        self._model = None


def load_teacher(
    cfg: TeacherConfig, cache_dir: Path
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The frozen fp32 teacher and its tokenizer, for a script that needs nothing else."""
    teacher = Teacher(cfg, cache_dir)
    return teacher.model, teacher.tokenizer
