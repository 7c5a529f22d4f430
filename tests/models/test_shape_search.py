"""A shape for a budget (distill/models/shape_search.py): every candidate fits and its MLP fills
the budget, the best-scored one is built, and the search is cached."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import distill.models.shape_search as shape_search
from distill.cli import depth_from_command_line
from distill.config import StudentConfig
from distill.models import ModelError, build_student, planned_config
from distill.models.shape_search import (
    MLP_STEP,
    Shape,
    candidates,
    count_params,
    default_depths,
    search_shape,
    shape_config,
)
from tests.quantize.gguf_models import arch_model

VOCAB = 97
BLOCKS = (torch.arange(10 * 24).reshape(10, 24) * 31) % VOCAB


@pytest.fixture(scope="module")
def teacher():
    return arch_model("llama3", VOCAB, tie=False, layers=4)


def test_every_candidate_fits_and_its_mlp_fills_the_budget(teacher) -> None:
    budget = 0.7
    limit = budget * count_params(teacher.config)
    shapes = candidates(teacher.config, budget, [2, 3, 4])
    # hidden 64 and 32, one or two kv groups, three depths; none left without an MLP
    assert {(s.num_layers, s.num_key_value_heads, s.hidden_size) for s, _ in shapes} >= {
        (3, 2, 64),
        (4, 1, 32),
    }
    for shape, params in shapes:
        assert params == count_params(shape_config(teacher.config, shape))
        assert params <= limit, shape
        assert shape.intermediate_size % MLP_STEP == 0
        wider = Shape(
            shape.num_layers,
            shape.intermediate_size + MLP_STEP,
            shape.num_key_value_heads,
            shape.hidden_size,
        )
        full = shape.intermediate_size == teacher.config.intermediate_size
        assert full or count_params(shape_config(teacher.config, wider)) > limit, shape
    assert default_depths(teacher.config, budget) == [2, 3, 4]  # 2 full-width layers fit


def test_the_built_student_is_the_best_scored_shape_and_the_search_is_cached(
    teacher, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shape, layers, ranked = search_shape(teacher, BLOCKS, 0.7, [2, 3, 4], tmp_path, "key")
    kls = [r["kl"] for r in ranked]
    assert kls == sorted(kls) and len(ranked) == len(candidates(teacher.config, 0.7, [2, 3, 4]))
    assert Shape(**ranked[0]["shape"]) == shape and ranked[0]["layers"] == layers
    assert len(set(kls)) > 1  # the shapes were really scored apart

    def no_search(*args, **kwargs):
        raise AssertionError("searched again")

    monkeypatch.setattr(shape_search, "_run", no_search)
    cfg = StudentConfig(layers=None, budget=0.7, budget_depths=[2, 3, 4])
    student, _ = build_student(
        cfg, teacher, 0, train_blocks=BLOCKS, cache_dir=tmp_path, teacher_key=lambda: "key"
    )
    c = student.config
    assert c.distill_teacher_layers == layers
    assert (c.num_hidden_layers, c.intermediate_size) == (shape.num_layers, shape.intermediate_size)
    assert (c.num_key_value_heads, c.hidden_size) == (shape.num_key_value_heads, shape.hidden_size)
    assert count_params(c) <= 0.7 * count_params(teacher.config)
    assert planned_config(cfg, teacher.config).num_hidden_layers == 4  # the deepest stands in
    # The report says which shape was chosen and why.
    from distill.evaluate.report import student_lines
    from distill.evaluate.stage import student_shape

    (line,) = student_lines(student_shape(c, teacher.config))
    assert f"{shape.num_layers} of the teacher's 4 layers ({layers})" in line
    assert "Chosen for pair.student.budget=0.7 as the lowest KL to the teacher" in line
    assert f"({ranked[0]['kl']:.3f}, " in line and f"of {len(ranked)} shapes that fit" in line
    assert f"had {ranked[1]['kl']:.3f}" in line


def test_a_budget_nothing_fits_and_bad_settings_are_named(teacher, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no shape of depths"):
        search_shape(teacher, BLOCKS, 0.05, [4], tmp_path, "key")
    with pytest.raises(ModelError, match=r"budget_depths has \[5\]"):
        candidates(teacher.config, 0.7, [5])
    problems = StudentConfig(layers=[0, 1], budget=1.5).problems()
    assert any("budget=1.5: a fraction of the teacher" in p for p in problems)
    assert any("budget chooses the shape, but ['layers']" in p for p in problems)
    assert (
        "pair.student.budget_depths needs pair.student.budget"
        in StudentConfig(layers=[0], budget_depths=[2]).problems()
    )


def test_a_budget_on_the_command_line_clears_the_pair_files_shape() -> None:
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(
        {"pair": {"student": {"layers": [0, 1], "intermediate_size": 64, "budget": 0.5}}}
    )
    out = depth_from_command_line(cfg, ["pair.student.budget=0.5"])
    assert out.pair.student.layers is None and out.pair.student.intermediate_size is None
    kept = depth_from_command_line(cfg, ["pair.student.budget=0.5", "pair.student.layers=[0]"])
    assert kept.pair.student.layers == [0, 1]  # given on the command line too: left to the schema


def test_the_finalists_are_the_best_pruned_and_the_best_after_training_is_built(
    teacher, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stand-in training that reverses the pruned order: the worst of the three finalists
    must come out chosen, scored on blocks its training never saw."""
    _, _, pruned = search_shape(teacher, BLOCKS, 0.7, [2, 3, 4], tmp_path, "key")
    by_shape = {tuple(r["shape"].values()): r["kl"] for r in pruned}
    seen: list[tuple[int, ...]] = []

    def retrain(student, blocks, score, tick):
        c = student.config
        key = (c.num_hidden_layers, c.intermediate_size, c.num_key_value_heads, c.hidden_size)
        seen.append(key)
        # The candidate arrives as it was scored pruned, and trains on the other blocks.
        assert score(student) == pytest.approx(by_shape[key], abs=1e-5)
        assert torch.equal(blocks, BLOCKS[shape_search.SCORE_BLOCKS :])
        tick()
        return {1: 5.0, 2: 5.0 - by_shape[key]}

    finalists = shape_search.Finalists(3, 2, retrain, "reversed")
    shape, layers, ranked = search_shape(
        teacher, BLOCKS, 0.7, [2, 3, 4], tmp_path, "key", finalists
    )
    assert sorted(seen) == sorted(tuple(r["shape"].values()) for r in pruned[:3])
    assert [shape_search.final_kl(r) for r in ranked[:3]] == sorted(
        5.0 - r["kl"] for r in pruned[:3]
    )
    assert ranked[0]["shape"] == pruned[2]["shape"] and Shape(**pruned[2]["shape"]) == shape
    assert ranked[3:] == pruned[3:] and layers == pruned[2]["layers"]

    # Cached per recipe: the same recipe trains nothing; another trains again.
    seen.clear()
    search_shape(teacher, BLOCKS, 0.7, [2, 3, 4], tmp_path, "key", finalists)
    assert seen == []
    other = shape_search.Finalists(2, 2, retrain, "another recipe")
    search_shape(teacher, BLOCKS, 0.7, [2, 3, 4], tmp_path, "key", other)
    assert len(seen) == 2

    # The report says why: trained, and what the runner-up had.
    from distill.evaluate.report import student_lines
    from distill.evaluate.stage import student_shape

    cfg = StudentConfig(layers=None, budget=0.7, budget_depths=[2, 3, 4])
    student, _ = build_student(
        cfg,
        teacher,
        0,
        train_blocks=BLOCKS,
        cache_dir=tmp_path,
        teacher_key=lambda: "key",
        finalists=finalists,
    )
    assert student.config.num_hidden_layers == shape.num_layers
    (line,) = student_lines(student_shape(student.config, teacher.config))
    assert "the 3 with the lowest KL to the teacher before training were each trained 2 steps" in (
        line
    )
    assert f"lowest KL after ({5.0 - pruned[2]['kl']:.3f}; {pruned[2]['kl']:.3f} before;" in line
    assert f"had {5.0 - pruned[1]['kl']:.3f} after ({pruned[1]['kl']:.3f} before)" in line


def test_finalists_need_blocks_beyond_the_scored_ones(teacher, tmp_path: Path) -> None:
    finalists = shape_search.Finalists(2, 1, lambda *a: {1: 0.0}, "any")
    with pytest.raises(ModelError, match="budget_finalists=2 needs training blocks beyond"):
        search_shape(
            teacher, BLOCKS[: shape_search.SCORE_BLOCKS], 0.7, [3], tmp_path, "key", finalists
        )
    problems = StudentConfig(layers=None, budget=0.5, budget_finalists=-1).problems()
    assert "pair.student.budget_finalists=-1: must be >= 0" in problems
    bad = StudentConfig(layers=None, budget=0.5, budget_finalist_steps=0).problems()
    assert any("budget_finalist_steps=0: must be >= 1" in p for p in bad)
