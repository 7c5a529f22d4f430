"""The student a config asks for: its planned config (for pre-flight checks) and the model.

Above :mod:`distill.models.student` (construction) and :mod:`distill.models.layer_cache`
(which layers a ``num_layers`` student keeps): those two never import this module, so the
search can build students without a circle.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from distill.models.layer_cache import greedy_layers
from distill.models.load import ModelError, load_causal_lm, load_config, load_tokenizer
from distill.models.student import (
    build_student_from_config,
    build_student_from_teacher,
    check_layers,
    check_num_layers,
    config_with_overrides,
    num_layers_of,
    subset_config,
)

if TYPE_CHECKING:
    from distill.config import StudentConfig

log = logging.getLogger(__name__)


def student_layers(
    cfg: StudentConfig,
    teacher: PreTrainedModel,
    train_blocks: torch.Tensor | None,
    cache_dir: Path | None,
    teacher_key: Callable[[], str] | None = None,
) -> list[int]:
    """The teacher layers a from_teacher student keeps: ``layers``, or for ``num_layers``
    alone the greedy search's choice (:func:`distill.models.layer_cache.greedy_layers`,
    cached under the teacher's weights hash: ``teacher_key()``, asked for only when the
    search runs, or hashed here when None).

    Raises:
        ModelError: layers outside the teacher, too many layers, or ``num_layers`` alone
            without the training blocks and cache folder the search needs.
    """
    n_teacher = num_layers_of(teacher.config)
    if cfg.layers is not None:
        check_layers(list(cfg.layers), n_teacher)
        return list(cfg.layers)
    assert cfg.num_layers is not None  # the schema requires one of the two
    check_num_layers(cfg.num_layers, n_teacher)
    if cfg.num_layers == n_teacher:
        return list(range(n_teacher))
    if train_blocks is None or cache_dir is None:
        raise ModelError(
            "pair.student.num_layers alone needs the training blocks to choose layers by; "
            "give pair.student.layers=[...] instead"
        )
    key = teacher_key() if teacher_key is not None else None
    layers = greedy_layers(teacher, train_blocks, cfg.num_layers, cache_dir, key)
    log.info("student: %d layers chosen by greedy search: %s", len(layers), layers)
    return layers


def build_student(
    cfg: StudentConfig,
    teacher: PreTrainedModel,
    seed: int,
    *,
    train_blocks: torch.Tensor | None = None,
    cache_dir: Path | None = None,
    teacher_key: Callable[[], str] | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """The student before distillation, and its own tokenizer when it brings one.

    Args:
        train_blocks: ``(N, T)`` training token ids; needed only when ``pair.student.
            num_layers`` is given without ``layers`` (the greedy search scores on them).
        cache_dir: where that search's trajectory is cached (``distill.caches.cache_root``).
        teacher_key: gives the teacher's weights hash, the search cache's key, when the search
            runs (the run's :class:`~distill.models.Teacher` hashes once); None: hashed here.

    Raises:
        ModelError: see :func:`student_layers`, :func:`build_student_from_teacher`,
            :func:`build_student_from_config` and :func:`distill.models.load.load_causal_lm`.
    """
    if cfg.init == "from_teacher":
        layers = student_layers(cfg, teacher, train_blocks, cache_dir, teacher_key)
        torch.manual_seed(seed)
        return build_student_from_teacher(teacher, layers), None
    torch.manual_seed(seed)
    if cfg.init == "from_config":
        return build_student_from_config(teacher.config, dict(cfg.config_overrides)), None
    assert cfg.name_or_path is not None
    tokenizer = load_tokenizer(cfg.name_or_path, trust_remote_code=cfg.trust_remote_code)
    model = load_causal_lm(
        cfg.name_or_path, what="student", trust_remote_code=cfg.trust_remote_code
    )
    return model, tokenizer


def planned_config(cfg: StudentConfig, teacher_config: Any) -> Any:
    """The config the student will have, from the teacher's config alone (no weights), for
    the pre-flight checks. A ``num_layers`` student's per-layer attributes follow the first
    layers (which ones the search keeps is not known yet; only the count matters there).

    Raises:
        ModelError: as :func:`check_layers`, :func:`check_num_layers`,
            :func:`config_with_overrides`; a pretrained student's config cannot be read.
    """
    if cfg.init == "from_teacher":
        n_teacher = num_layers_of(teacher_config)
        if cfg.layers is not None:
            check_layers(list(cfg.layers), n_teacher)
            return subset_config(teacher_config, list(cfg.layers))
        assert cfg.num_layers is not None
        check_num_layers(cfg.num_layers, n_teacher)
        return subset_config(teacher_config, list(range(cfg.num_layers)))
    if cfg.init == "from_config":
        return config_with_overrides(teacher_config, dict(cfg.config_overrides))
    assert cfg.name_or_path is not None
    return load_config(cfg.name_or_path, what="student", trust_remote_code=cfg.trust_remote_code)
