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

from distill.models.footprint import weights_hash
from distill.models.layer_cache import greedy_layers
from distill.models.load import ModelError, load_causal_lm, load_config, load_tokenizer
from distill.models.shape_search import (
    SHAPE_SEARCH_ATTR,
    Finalists,
    candidates,
    default_depths,
    final_kl,
    search_shape,
    shape_config,
)
from distill.models.student import (
    build_student_from_config,
    build_student_from_teacher,
    check_layers,
    check_num_layers,
    config_with_overrides,
    num_layers_of,
    subset_config,
)
from distill.models.width import Width, check_width, prune_width, width_config

if TYPE_CHECKING:
    from distill.config import StudentConfig

log = logging.getLogger(__name__)


def width_of(cfg: StudentConfig) -> Width:
    """The width cut a from_teacher student config asks for."""
    return Width(cfg.intermediate_size, cfg.num_key_value_heads, cfg.hidden_size)


def budget_shape(
    cfg: StudentConfig,
    teacher: PreTrainedModel,
    train_blocks: torch.Tensor | None,
    cache_dir: Path | None,
    teacher_key: Callable[[], str] | None,
    finalists: Finalists | None = None,
) -> tuple[list[int], Width, dict[str, Any]]:
    """The layers and width of the best-scored shape within ``pair.student.budget``
    (:func:`distill.models.shape_search.search_shape`, cached), and what the search found:
    the budget, the candidates' count, the chosen one's and the runner-up's records.

    Raises:
        ModelError: no training blocks or cache folder to search with, or no shape fits.
    """
    if train_blocks is None or cache_dir is None:
        raise ModelError("pair.student.budget needs the training blocks to score shapes on")
    assert cfg.budget is not None
    depths = list(cfg.budget_depths or default_depths(teacher.config, cfg.budget))
    key = teacher_key() if teacher_key is not None else weights_hash(teacher)
    shape, layers, ranked = search_shape(
        teacher, train_blocks, cfg.budget, depths, cache_dir, key, finalists
    )
    chosen = ranked[0]
    trained = sum("kl_trained" in r for r in ranked)
    why = f"KL {chosen['kl']:.3f} pruned, the best of {len(ranked)} shapes"
    if trained:
        why = (
            f"KL {final_kl(chosen):.3f} after {max(map(int, chosen['kl_trained']))} steps, the "
            f"best of the {trained} best pruned of {len(ranked)} shapes"
        )
    log.info(
        "student: budget %.3f of the teacher -> %d layers, MLP %d, %d kv groups, hidden %d "
        "(%.1fM parameters; %s)",
        cfg.budget,
        shape.num_layers,
        shape.intermediate_size,
        shape.num_key_value_heads,
        shape.hidden_size,
        chosen["params"] / 1e6,
        why,
    )
    summary = {"budget": cfg.budget, "candidates": len(ranked), "chosen": chosen}
    summary["finalists"] = trained
    summary["runner_up"] = ranked[1] if len(ranked) > 1 else None
    return layers, shape.width(), summary


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
    finalists: Finalists | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """The student before distillation, and its own tokenizer when it brings one.

    Args:
        train_blocks: ``(N, T)`` training token ids; needed only when ``pair.student.
            num_layers`` is given without ``layers`` (the greedy search scores on them).
        cache_dir: where that search's trajectory is cached (``distill.caches.cache_root``).
        teacher_key: gives the teacher's weights hash, the search cache's key, when the search
            runs (the run's :class:`~distill.models.Teacher` hashes once); None: hashed here.
        finalists: ``pair.student.budget``: how the best pruned shapes are short-trained
            before the choice (the train stage's :func:`distill.train.short_train.finalists`);
            None chooses the best pruned shape.

    Raises:
        ModelError: see :func:`student_layers`, :func:`build_student_from_teacher`,
            :func:`build_student_from_config`, :func:`distill.models.load.load_causal_lm`;
            a width cut beyond the teacher's or of an architecture width pruning lacks.
    """
    if cfg.init == "from_teacher":
        search = None
        if cfg.budget is not None:
            layers, width, search = budget_shape(
                cfg, teacher, train_blocks, cache_dir, teacher_key, finalists
            )
        else:
            width = width_of(cfg)
            check_width(teacher.config, width)  # before any search or copy
            layers = student_layers(cfg, teacher, train_blocks, cache_dir, teacher_key)
        torch.manual_seed(seed)
        student = build_student_from_teacher(teacher, layers)
        if not width.cuts():
            return student, None
        if train_blocks is None:
            raise ModelError(
                "a width cut (pair.student.intermediate_size / num_key_value_heads / "
                "hidden_size) needs training blocks to rank channels on"
            )
        calibration = train_blocks[: cfg.width_calibration_blocks]
        student = prune_width(student, width, calibration)
        if search is not None:  # saved in config.json: the report says why this shape
            setattr(student.config, SHAPE_SEARCH_ATTR, search)
        return student, None
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
    if cfg.init == "from_teacher" and cfg.budget is not None:
        # The shape is chosen later, by measurement; the deepest candidate stands for it.
        depths = cfg.budget_depths or default_depths(teacher_config, cfg.budget)
        shapes = candidates(teacher_config, cfg.budget, list(depths))
        return shape_config(teacher_config, shapes[-1][0])
    if cfg.init == "from_teacher":
        n_teacher = num_layers_of(teacher_config)
        width = width_of(cfg)
        if cfg.layers is not None:
            check_layers(list(cfg.layers), n_teacher)
            depth_cut = subset_config(teacher_config, list(cfg.layers))
        else:
            assert cfg.num_layers is not None
            check_num_layers(cfg.num_layers, n_teacher)
            depth_cut = subset_config(teacher_config, list(range(cfg.num_layers)))
        return width_config(depth_cut, width) if width.cuts() else depth_cut
    if cfg.init == "from_config":
        return config_with_overrides(teacher_config, dict(cfg.config_overrides))
    assert cfg.name_or_path is not None
    return load_config(cfg.name_or_path, what="student", trust_remote_code=cfg.trust_remote_code)
