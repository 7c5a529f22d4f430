"""A student shape chosen for a budget: depth x key/value groups x hidden size, each with the
widest MLP that fits, every candidate pruned from the teacher and scored before training.

``pair.student.budget`` is a fraction of the teacher's parameters (so of its weight bytes at
any one precision). For every depth in ``pair.student.budget_depths`` (the layers the greedy
removal keeps, :mod:`distill.models.layer_cache`), every number of key/value groups, and a
few hidden sizes, the MLP is the widest multiple of :data:`MLP_STEP` channels (the GGUF
block size, so every quantized type stores it) that keeps the student within the budget; a
shape with no MLP left is not a candidate. Parameters are counted on a model built on the
meta device from the shape's config, so they are exact for any architecture, tied or not.

Each candidate is cut from the teacher (depth, then width by activation importance,
:mod:`distill.models.width`; importance measured once per depth) and scored by KL(teacher ||
student) on training blocks: Minitron ranks pruned-only candidates this way. It also found
that this ranking narrows the field but settles only after light retraining, and so did we
(docs/students.md: the best pruned shape finished second after 60 steps). So the best
``pair.student.budget_finalists`` shapes are then each trained a few steps
(``budget_finalist_steps``, the run's own loss and learning rate; :class:`Finalists`, given by
the train stage) on training blocks the scoring never uses, and scored again on the same
blocks at a few points along the way; the lowest KL after training wins. With fewer than two
finalists the lowest pruned KL wins. The scores are cached per teacher, calibration blocks,
budget, depths (and the finalists' recipe) under ``cache_dir/shape_search/``, so a run (or a
sweep) pays for a search once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, PreTrainedModel

from distill import metrics
from distill.data import blocks_hash
from distill.models.footprint import param_count
from distill.models.layer_cache import greedy_layers
from distill.models.load import ModelError
from distill.models.student import (
    build_student_from_teacher,
    model_from_state,
    num_layers_of,
    subset_config,
)
from distill.models.width import (
    Width,
    choose_kept,
    cut_state,
    head_layout,
    measure_importance,
    width_config,
)
from distill.run_dir import write_json_atomic

log = logging.getLogger(__name__)

# MLP widths and cut hidden sizes are multiples of this: GGUF's Q8_0/Q4_0 blocks are 32
# values along a row (a row is hidden_size long, or intermediate_size in down_proj).
MLP_STEP = 32
# Hidden sizes tried, as fractions of the teacher's.
HIDDEN_FRACTIONS = (1.0, 0.875, 0.75)
# The student config attribute holding what the search found (saved in config.json).
SHAPE_SEARCH_ATTR = "distill_shape_search"
# Training blocks the candidates are cut and scored on.
SCORE_BLOCKS = 8
_FORMAT = 1


# Short-trains a student in place on ``blocks`` ``(N, T)``, calling ``tick()`` after each
# step and ``score(student)`` at a few of them: returns ``{step: score}`` (the last included).
Retrain = Callable[
    [PreTrainedModel, torch.Tensor, Callable[[PreTrainedModel], float], Callable[[], object]],
    dict[int, float],
]


@dataclass(frozen=True)
class Finalists:
    """How the best pruned shapes are short-trained before the choice.

    Attributes:
        count: shapes trained (the best by pruned KL); below 2 nothing is trained.
        steps: optimizer steps each, for the progress bar and the log.
        retrain: trains one of them (the train stage's loss and optimizer).
        recipe: what ``retrain`` does, as text: part of the cache key, so another loss,
            learning rate or step count searches again.
    """

    count: int
    steps: int
    retrain: Retrain
    recipe: str


@dataclass(frozen=True)
class Shape:
    """A student shape: depth and widths (the teacher's where it keeps them)."""

    num_layers: int
    intermediate_size: int
    num_key_value_heads: int
    hidden_size: int

    def width(self) -> Width:
        return Width(self.intermediate_size, self.num_key_value_heads, self.hidden_size)


def shape_config(teacher_config: Any, shape: Shape) -> Any:
    """The config of a student of ``shape`` (its first layers stand for any of that depth)."""
    depth = subset_config(teacher_config, list(range(shape.num_layers)))
    return width_config(depth, shape.width())


def count_params(config: Any) -> int:
    """Parameters of a model of ``config`` (tied tensors once), built on the meta device."""
    with torch.device("meta"):
        return param_count(AutoModelForCausalLM.from_config(config))


def _hidden_sizes(teacher_config: Any) -> list[int]:
    """The teacher's hidden size and :data:`HIDDEN_FRACTIONS` of it in whole GGUF blocks."""
    full = int(teacher_config.hidden_size)
    cut = {int(full * f) // MLP_STEP * MLP_STEP for f in HIDDEN_FRACTIONS}
    return sorted({full} | {s for s in cut if MLP_STEP <= s <= full}, reverse=True)


def default_depths(teacher_config: Any, budget: float, count: int = 4) -> list[int]:
    """``count`` depths evenly spread from the deepest full-width student within ``budget``
    (the depth-only cut) to the teacher's own depth."""
    n = num_layers_of(teacher_config)
    limit = budget * count_params(teacher_config)
    _, n_kv, _ = head_layout(teacher_config)
    mlp, hidden = int(teacher_config.intermediate_size), int(teacher_config.hidden_size)
    fits = [
        d
        for d in range(1, n + 1)
        if count_params(shape_config(teacher_config, Shape(d, mlp, n_kv, hidden))) <= limit
    ]
    low = max(fits, default=1)
    return sorted({round(low + (n - low) * i / (count - 1)) for i in range(count)})


def candidates(teacher_config: Any, budget: float, depths: list[int]) -> list[tuple[Shape, int]]:
    """Every shape within ``budget`` (a fraction of the teacher's parameters) and its
    parameter count: per depth, key/value groups and hidden size, the widest MLP in steps of
    :data:`MLP_STEP` that fits. Ordered by depth, then groups, then hidden size.

    Raises:
        ModelError: a depth the teacher does not have, an architecture width pruning does
            not support, or no shape that fits.
    """
    n_teacher = num_layers_of(teacher_config)
    bad = [d for d in depths if not 1 <= d <= n_teacher]
    if bad:
        raise ModelError(
            f"pair.student.budget_depths has {bad}: the teacher has {n_teacher} layers"
        )
    limit = budget * count_params(teacher_config)
    _, n_kv, _ = head_layout(teacher_config)
    full_mlp = int(teacher_config.intermediate_size)
    out = []
    for depth in sorted(set(depths)):
        for groups in range(1, n_kv + 1):
            for hidden in _hidden_sizes(teacher_config):
                # Parameters are affine in the MLP width at a fixed depth, groups and hidden.
                base = count_params(
                    shape_config(teacher_config, Shape(depth, MLP_STEP, groups, hidden))
                )
                step = (
                    count_params(
                        shape_config(teacher_config, Shape(depth, 2 * MLP_STEP, groups, hidden))
                    )
                    - base
                )
                fits = int((limit - base) // step) + 1 if limit >= base else 0
                mlp = min(fits * MLP_STEP, full_mlp // MLP_STEP * MLP_STEP)
                if mlp >= MLP_STEP:
                    shape = Shape(depth, mlp, groups, hidden)
                    out.append((shape, base + (mlp // MLP_STEP - 1) * step))
    if not out:
        raise ModelError(
            f"pair.student.budget={budget}: no shape of depths {sorted(depths)} fits "
            "(one MLP block per layer is the least kept); raise the budget or add smaller depths"
        )
    return out


def _cache_path(
    cache_dir: Path,
    teacher_key: str,
    blocks: torch.Tensor,
    budget: float,
    depths: list[int],
    finalists: str = "",
) -> Path:
    key: list[Any] = [_FORMAT, teacher_key, blocks_hash(blocks), budget, sorted(depths)]
    payload = json.dumps(key + [finalists] if finalists else key)
    return (
        Path(cache_dir)
        / "shape_search"
        / f"{hashlib.sha256(payload.encode()).hexdigest()[:16]}.json"
    )


def _score(student: PreTrainedModel, blocks: torch.Tensor, reference: list[Any]) -> float:
    sums = metrics.score_blocks(student, blocks, 1, reference)
    kl = float(metrics.quality_fields(sums)["kl_to_teacher"])
    return kl if math.isfinite(kl) else math.inf  # a broken cut ranks last


def search_shape(
    teacher: PreTrainedModel,
    train_blocks: torch.Tensor,
    budget: float,
    depths: list[int],
    cache_dir: Path,
    teacher_key: str,
    finalists: Finalists | None = None,
) -> tuple[Shape, list[int], list[dict[str, Any]]]:
    """The best-scored shape within ``budget``, the teacher layers it keeps, and every
    candidate's record (shape, parameters, pruned KL ``kl``), best first. With
    ``finalists``, the trained ones come first, ordered by their KL after training (their
    ``kl_trained``: ``{step: KL}``), then the others by pruned KL. Cached (module docstring).

    Raises:
        ModelError: no shape fits the budget, or see :func:`candidates`.
    """
    blocks = train_blocks[:SCORE_BLOCKS]
    shapes = candidates(teacher.config, budget, depths)
    path = _cache_path(cache_dir, teacher_key, blocks, budget, depths)
    ranked = _read(path)
    if ranked is None:
        ranked = _run(teacher, train_blocks, blocks, shapes, cache_dir, teacher_key)
        _write(path, ranked)
    if finalists is not None and finalists.count >= 2 and len(ranked) >= 2:
        recipe = f"{finalists.count} x {finalists.recipe}"
        final_path = _cache_path(cache_dir, teacher_key, blocks, budget, depths, recipe)
        trained = _read(final_path)
        if trained is None:
            trained = _train_finalists(teacher, train_blocks, blocks, ranked, finalists)
            _write(final_path, trained)
        ranked = trained
    best = Shape(**ranked[0]["shape"])
    return best, list(ranked[0]["layers"]), ranked


def _write(path: Path, ranked: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"ranked": ranked})
    log.info("shape search: cached in %s", path)


def final_kl(record: dict[str, Any]) -> float:
    """A finalist's KL after its last training step."""
    trained = record["kl_trained"]
    return float(trained[max(trained, key=int)])


def _cut(
    teacher: PreTrainedModel,
    blocks: torch.Tensor,
    record: dict[str, Any],
    importance: dict[tuple[int, ...], Any],
) -> PreTrainedModel:
    """The candidate of ``record`` cut from the teacher again, as :func:`_run` cut it; the
    importance of each depth cut is measured once (``importance``, by kept layers)."""
    shape = Shape(**record["shape"])
    layers = tuple(record["layers"])
    cut = build_student_from_teacher(teacher, list(layers))
    if layers not in importance:
        importance[layers] = measure_importance(cut, blocks, 1)
    kept = choose_kept(cut.config, shape.width(), importance[layers])
    return model_from_state(width_config(cut.config, shape.width()), cut_state(cut, kept))


def _train_finalists(
    teacher: PreTrainedModel,
    train_blocks: torch.Tensor,
    blocks: torch.Tensor,
    ranked: list[dict[str, Any]],
    finalists: Finalists,
) -> list[dict[str, Any]]:
    """``ranked`` with its best ``finalists.count`` short-trained and re-ranked first."""
    count = min(finalists.count, len(ranked))
    rest = train_blocks[blocks.shape[0] :]  # never the blocks the scores are taken on
    if rest.shape[0] == 0:
        raise ModelError(
            f"pair.student.budget_finalists={finalists.count} needs training blocks beyond "
            f"the {blocks.shape[0]} the shapes are scored on: set it to 0 or give more text"
        )
    log.info(
        "shape search: the best %d shapes pruned, each trained %d steps on %d training blocks "
        "and scored again (the bar's estimate is for all of them)",
        count,
        finalists.steps,
        rest.shape[0],
    )
    reference = metrics.teacher_sides(teacher, blocks, 1)
    trained: list[dict[str, Any]] = []
    importance: dict[tuple[int, ...], Any] = {}
    start = time.perf_counter()
    with tqdm(total=count * finalists.steps, desc="finalists", unit="step") as bar:
        for record in ranked[:count]:
            bar.set_postfix_str(_label(record))
            student = _cut(teacher, blocks, record, importance)
            scores = finalists.retrain(
                student, rest, lambda m: _score(m, blocks, reference), lambda: bar.update(1)
            )
            trained.append({**record, "kl_trained": {str(k): v for k, v in scores.items()}})
            del student
    trained.sort(key=lambda r: (final_kl(r), -r["params"]))
    log.info(
        "shape search: %d finalists trained in %.0f s; KL after training: %s",
        count,
        time.perf_counter() - start,
        ", ".join(f"{_label(r)} {final_kl(r):.3f}" for r in trained),
    )
    return trained + ranked[count:]


def _label(record: dict[str, Any]) -> str:
    s = record["shape"]
    return (
        f"{s['num_layers']}L/MLP {s['intermediate_size']}/kv {s['num_key_value_heads']}/"
        f"h {s['hidden_size']}"
    )


def _read(path: Path) -> list[dict[str, Any]] | None:
    try:
        ranked = json.loads(path.read_text())["ranked"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return ranked if isinstance(ranked, list) and ranked else None


def _run(
    teacher: PreTrainedModel,
    train_blocks: torch.Tensor,
    blocks: torch.Tensor,
    shapes: list[tuple[Shape, int]],
    cache_dir: Path,
    teacher_key: str,
) -> list[dict[str, Any]]:
    depths = sorted({s.num_layers for s, _ in shapes})
    log.info(
        "shape search: %d shapes at depths %s; the greedy layer path first (cached), then "
        "each shape is cut and scored on %d training blocks",
        len(shapes),
        depths,
        blocks.shape[0],
    )
    layers = {d: greedy_layers(teacher, train_blocks, d, cache_dir, teacher_key) for d in depths}
    reference = metrics.teacher_sides(teacher, blocks, 1)
    records = []
    start = time.perf_counter()
    with tqdm(total=len(shapes), desc="shape search", unit="shape") as bar:
        for depth in depths:
            cut = build_student_from_teacher(teacher, layers[depth])
            importance = measure_importance(cut, blocks, 1)
            for shape, params in [(s, p) for s, p in shapes if s.num_layers == depth]:
                kept = choose_kept(cut.config, shape.width(), importance)
                config = width_config(cut.config, shape.width())
                student = model_from_state(config, cut_state(cut, kept))
                records.append(
                    {
                        "shape": asdict(shape),
                        "params": params,
                        "layers": layers[depth],
                        "kl": _score(student, blocks, reference),
                    }
                )
                bar.update(1)
    log.info("shape search: %d shapes scored in %.0f s", len(records), time.perf_counter() - start)
    return sorted(records, key=lambda r: (r["kl"], -r["params"]))
