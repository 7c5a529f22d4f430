"""The budget search's finalists train with the run's own step (distill/train/short_train.py):
the KL to the teacher falls, every step ticks, the scores come at the promised steps, and
the teacher is never changed."""

from __future__ import annotations

import torch

from distill.config import PairConfig, PipelineConfig, StudentConfig, TrainConfig
from distill.metrics import quality_fields, score_blocks, teacher_sides
from distill.train.short_train import finalists, score_steps
from tests.conftest import tiny_llama

VOCAB = 61


def test_a_finalist_trains_toward_the_teacher_and_is_scored_at_its_steps() -> None:
    torch.manual_seed(0)
    teacher = tiny_llama(VOCAB, layers=4, seed=1, tie=False)
    with torch.no_grad():  # a peaked teacher, far from a random student's near-uniform guess
        teacher.lm_head.weight.mul_(30.0)
    before_teacher = {k: v.clone() for k, v in teacher.state_dict().items()}
    blocks = torch.randint(0, VOCAB, (8, 16))
    held = blocks[:4]  # the objective's own blocks: what a few steps must move
    reference = teacher_sides(teacher, held, 4)

    def kl(model) -> float:
        return float(quality_fields(score_blocks(model, held, 4, reference))["kl_to_teacher"])

    cfg = PipelineConfig(
        pair=PairConfig(name="t", student=StudentConfig(budget=0.5, budget_finalist_steps=24)),
        train=TrainConfig(batch_size=4, lr=1e-2, warmup_steps=1),
    )
    search = finalists(cfg, teacher)
    assert (search.count, search.steps) == (3, 24) and "24 steps of batch 4" in search.recipe

    student = tiny_llama(VOCAB, layers=2, seed=2, tie=False).train()
    start, ticks = kl(student), []
    scores = search.retrain(student, blocks, kl, lambda: ticks.append(1))
    assert list(scores) == score_steps(24) == [6, 12, 24] and len(ticks) == 24
    assert scores[24] < 0.9 * start, (start, scores)
    assert scores[24] == kl(student)  # the last score is the student as it was left
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, before_teacher[name]), name


def test_the_finalists_settings_shape_a_budget_run_only() -> None:
    """A run without a budget keeps its fingerprint (so a run dir trained before these
    settings existed is still finished); with a budget they choose the student."""
    from distill.train.run_state import config_fingerprint

    def fingerprint(finalists: int, **student) -> str:
        pair = PairConfig(name="t", student=StudentConfig(budget_finalists=finalists, **student))
        return config_fingerprint(PipelineConfig(pair=pair))

    assert fingerprint(3, layers=[0, 1]) == fingerprint(5, layers=[0, 1])
    assert fingerprint(3, budget=0.5) != fingerprint(5, budget=0.5)
