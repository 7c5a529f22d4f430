"""Hidden-state matching: the recorded layer mapping (llama and GPT-2 layouts), the distance,
its masking, zero for an identical student, positive with a gradient otherwise, and the
errors raised before any step."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from transformers import AutoModelForCausalLM

from distill.config import LossConfig
from distill.models.student import build_student_from_config, build_student_from_teacher
from distill.train.chunked_loss import fused_head
from distill.train.hidden_states import (
    HiddenStateError,
    capture_outputs,
    hidden_match,
    hidden_state_loss,
    per_position,
)
from distill.train.losses import IGNORE_INDEX, KDLoss, scored_positions
from distill.train.step import Batch, StepContext, micro_batch_loss
from tests.conftest import tiny_gpt2, tiny_llama

TEACHERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def _ctx(student, teacher, *, kind="cosine", weight=1.0, kd_ratio=0.5, chunk=None) -> StepContext:
    return StepContext(
        student=student,
        teacher=teacher,
        optimizer=torch.optim.AdamW(student.parameters(), lr=1e-3),
        accelerator=Accelerator(cpu=True),
        kd_ratio=kd_ratio,
        max_grad_norm=1.0,
        kd_loss=KDLoss("forward_kl"),
        chunk_size=chunk,
        student_head=fused_head(student) if chunk else None,
        teacher_head=fused_head(teacher) if chunk and kd_ratio > 0 else None,
        hidden=hidden_match(LossConfig(hidden_weight=weight, hidden_loss=kind), student, teacher),
    )


@pytest.mark.parametrize("arch", sorted(TEACHERS))
def test_layer_mapping_is_recorded_and_pairs_the_copied_layers(arch: str, tmp_path: Path) -> None:
    teacher = TEACHERS[arch](64, layers=4, seed=1)
    student = build_student_from_teacher(teacher, [0, 1, 3])
    assert student.config.distill_teacher_layers == [0, 1, 3]
    # The mapping survives the round trip every run dir and checkpoint goes through.
    student.save_pretrained(str(tmp_path))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    assert reloaded.config.distill_teacher_layers == [0, 1, 3]

    match = hidden_match(LossConfig(hidden_weight=1.0), reloaded, teacher)
    assert match is not None and match.pairs == ((0, 0), (1, 1), (2, 3))
    ids = torch.randint(0, 64, (2, 6))
    with (
        capture_outputs(match.student_layers, [0, 1, 2]) as s_out,
        capture_outputs(match.teacher_layers, [0, 1, 3]) as t_out,
    ):
        with torch.no_grad():
            reloaded(input_ids=ids)
            teacher(input_ids=ids)
    # The first two student layers are exact copies fed the same input: equal outputs, so the
    # hooks sit on the right blocks of both layouts. The third is fed layer 1's output, not
    # layer 2's, so it differs from the teacher's layer 3.
    assert torch.allclose(s_out[0], t_out[0], atol=1e-6)
    assert torch.allclose(s_out[1], t_out[1], atol=1e-6)
    assert not torch.allclose(s_out[2], t_out[3], atol=1e-3)
    # The raw block output, before the final norm: the last block's is not hidden_states[-1].
    out = teacher(input_ids=ids, output_hidden_states=True)
    assert torch.allclose(t_out[1], out.hidden_states[2], atol=1e-6)
    assert not torch.allclose(t_out[3], out.hidden_states[-1], atol=1e-3)
    # Hooks are gone after the block: a new forward stores nothing.
    t_out.clear()
    teacher(input_ids=ids)
    assert t_out == {}


def test_per_position_distances() -> None:
    torch.manual_seed(0)
    h = torch.randn(2, 3, 8)
    for kind in ("cosine", "mse"):
        assert per_position(h, h, kind).abs().max() < 1e-6
    # cosine ignores scale, mse is relative to the teacher's norm.
    assert torch.allclose(per_position(2 * h, h, "cosine"), torch.zeros(2, 3), atol=1e-6)
    assert torch.allclose(per_position(-h, h, "cosine"), torch.full((2, 3), 2.0), atol=1e-6)
    assert torch.allclose(per_position(2 * h, h, "mse"), torch.ones(2, 3), atol=1e-6)
    # Both are invariant to scaling student and teacher together: no depth-dependent scale.
    g = torch.randn(2, 3, 8)
    for kind in ("cosine", "mse"):
        assert torch.allclose(per_position(10 * g, 10 * h, kind), per_position(g, h, kind))


def test_hidden_loss_is_masked_and_normalised_like_the_logit_loss() -> None:
    teacher = tiny_llama(64, layers=2, seed=1)
    match = hidden_match(
        LossConfig(hidden_weight=1.0), build_student_from_teacher(teacher, [1]), teacher
    )
    torch.manual_seed(0)
    s = {0: torch.randn(2, 5, 32)}
    t = {1: torch.randn(2, 5, 32)}
    labels = torch.randint(0, 64, (2, 5))
    labels[1, 3:] = IGNORE_INDEX
    valid = scored_positions(labels)
    # Garbage where no loss is taken (the ignored targets and the last position) changes nothing.
    s_bad = {0: s[0].clone()}
    s_bad[0][1, 2:] = float("nan")
    s_bad[0][:, -1] = float("inf")
    got = hidden_state_loss(match, s_bad, t, valid, num_tokens=7)
    expected = per_position(s[0][:, :-1], t[1][:, :-1], "cosine")[valid].sum() / 7
    assert torch.isfinite(got) and torch.allclose(got, expected)
    assert int(valid.sum()) == 4 + 2


def test_hidden_loss_averages_over_the_matched_layers() -> None:
    """Three matched layers with distances 1, 2 and 6 per position: the loss is their mean,
    3 (a sum would be 9), whatever the number of layers matched."""
    teacher = tiny_llama(64, layers=3, seed=1)
    match = hidden_match(
        LossConfig(hidden_weight=1.0, hidden_loss="mse"),
        build_student_from_teacher(teacher, [0, 1, 2]),
        teacher,
    )
    assert match is not None and len(match.pairs) == 3
    h = torch.ones(1, 5, 32)
    teacher_out = {0: h, 1: h, 2: h}
    # mse = ||s - t||^2 / ||t||^2: (1 + sqrt(c)) h gives c at every position.
    student_out = {i: (1.0 + c**0.5) * h for i, c in enumerate((1.0, 2.0, 6.0))}
    valid = torch.ones(1, 4, dtype=torch.bool)
    got = hidden_state_loss(match, student_out, teacher_out, valid, num_tokens=4)
    assert got.item() == pytest.approx(3.0, rel=1e-5)


@pytest.mark.parametrize("arch", sorted(TEACHERS))
@pytest.mark.parametrize("kind", ["cosine", "mse"])
@pytest.mark.parametrize("chunk", [None, 4])
def test_hidden_loss_is_zero_for_a_student_identical_to_the_teacher(
    arch: str, kind: str, chunk: int | None
) -> None:
    teacher = TEACHERS[arch](64, layers=3, seed=1)
    # eval(): tiny GPT-2 has dropout, which would make an identical student differ.
    student = build_student_from_teacher(teacher, [0, 1, 2]).eval()
    ids = torch.randint(0, 64, (2, 8))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    _, parts = micro_batch_loss(
        _ctx(student, teacher, kind=kind, chunk=chunk), Batch(ids, ids, mask), torch.tensor(10.0)
    )
    assert abs(parts["hidden"]) < 1e-5 and abs(parts["kd"]) < 1e-5


@pytest.mark.parametrize("kd_ratio", [0.0, 0.5])
def test_hidden_loss_is_positive_and_has_a_gradient_otherwise(kd_ratio: float) -> None:
    teacher = tiny_llama(64, layers=4, seed=1)
    student = build_student_from_teacher(teacher, [0, 3]).train()
    ids = torch.randint(0, 64, (2, 8))
    batch, n = Batch(ids, ids), torch.tensor(14.0)
    grads = {}
    for weight in (0.0, 2.0):
        ctx = _ctx(student, teacher, weight=weight, kd_ratio=kd_ratio, chunk=4)
        if weight == 0.0:
            ctx.hidden = None
        student.zero_grad()
        loss, parts = micro_batch_loss(ctx, batch, n)
        loss.backward()
        grads[weight] = student.model.layers[0].mlp.up_proj.weight.grad.clone()
        if weight:
            assert parts["hidden"] > 1e-3
            blended = (1 - kd_ratio) * parts["ce"] + kd_ratio * parts["kd"]
            assert parts["loss"] == pytest.approx(blended + weight * parts["hidden"], rel=1e-5)
        else:
            assert parts["hidden"] == 0.0
    # The hidden term reaches the student's weights (the teacher gets none: it is frozen).
    assert not torch.allclose(grads[0.0], grads[2.0], atol=1e-7)
    assert all(p.grad is None for p in teacher.parameters())


def test_matching_errors_come_before_any_step() -> None:
    teacher = tiny_llama(64, layers=4, seed=1)
    cfg = LossConfig(hidden_weight=1.0)
    assert hidden_match(LossConfig(hidden_weight=0.0), tiny_llama(64), teacher) is None
    with pytest.raises(HiddenStateError, match="no distill_teacher_layers.*from_teacher"):
        hidden_match(
            cfg, build_student_from_config(teacher.config, {"num_hidden_layers": 2}), teacher
        )
    with pytest.raises(HiddenStateError, match="online teacher"):
        hidden_match(cfg, build_student_from_teacher(teacher, [0, 3]), None)
    wide = build_student_from_config(teacher.config, {"num_hidden_layers": 2, "hidden_size": 64})
    wide.config.distill_teacher_layers = [0, 3]
    with pytest.raises(HiddenStateError, match="hidden sizes differ.*student 64, teacher 32"):
        hidden_match(cfg, wide, teacher)
    deep = build_student_from_teacher(teacher, [0, 3])
    with pytest.raises(HiddenStateError, match=r"teacher layers \[3\].*has 2"):
        hidden_match(cfg, deep, tiny_llama(64, layers=2))
    # A mapping that does not fit the student's depth (a hand-edited config.json).
    odd = copy.deepcopy(deep)
    odd.config.distill_teacher_layers = [0]
    with pytest.raises(HiddenStateError, match="names 1 layers, but it has 2"):
        hidden_match(cfg, odd, teacher)


def test_a_student_cut_in_hidden_size_is_compared_with_the_teachers_kept_channels() -> None:
    from distill.models import Width, prune_width

    teacher = tiny_llama(64, layers=4, seed=1)
    silent = [3, 10, 17, 30]  # no norm reads them, so the cut drops exactly these
    with torch.no_grad():
        for layer in teacher.model.layers:
            layer.input_layernorm.weight[silent] = 0.0
            layer.post_attention_layernorm.weight[silent] = 0.0
        teacher.model.norm.weight[silent] = 0.0
    ids = torch.randint(0, 64, (2, 8))
    student = prune_width(build_student_from_teacher(teacher, [0, 3]), Width(hidden_size=28), ids)
    match = hidden_match(LossConfig(hidden_weight=1.0), student, teacher)
    kept = [c for c in range(32) if c not in silent]
    assert match.teacher_channels.tolist() == kept
    states = torch.arange(2 * 3 * 32, dtype=torch.float32).reshape(2, 3, 32)
    assert torch.equal(match.teacher_view(states), states[..., kept])
    _, parts = micro_batch_loss(
        _ctx(student, teacher, kind="mse"), Batch(ids, ids), torch.tensor(14.0)
    )
    assert 0.0 < parts["hidden"] < 1.0  # the kept channels line up: far below unrelated states
