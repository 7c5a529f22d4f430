"""Losses against hand-computed values, masking, and the reducer's edge cases."""

from __future__ import annotations

import math

import torch

from distill.losses import (
    IGNORE_INDEX,
    cross_entropy_per_token,
    forward_kl_per_token,
    reduce_masked,
    shift_for_next_token,
)


def test_forward_kl_matches_hand_computed_value() -> None:
    # p = softmax([0, ln 3]) = [1/4, 3/4]; q = softmax([0, 0]) = [1/2, 1/2]
    teacher = torch.tensor([[[0.0, math.log(3.0)]]])
    student = torch.zeros(1, 1, 2)
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    got = forward_kl_per_token(student, teacher, temperature=1.0)
    assert got.shape == (1, 1)
    assert abs(got.item() - expected) < 1e-6


def test_temperature_softens_both_and_t2_scales() -> None:
    teacher = torch.tensor([[[0.0, 2.0]]])
    student = torch.tensor([[[1.0, 0.0]]])
    t = 2.0
    plain = forward_kl_per_token(student / t, teacher / t, temperature=1.0)
    unscaled = forward_kl_per_token(student, teacher, temperature=t, scale_by_t2=False)
    scaled = forward_kl_per_token(student, teacher, temperature=t, scale_by_t2=True)
    assert torch.allclose(plain, unscaled)
    assert torch.allclose(scaled, unscaled * t * t)


def test_kl_zero_for_identical_and_non_negative() -> None:
    torch.manual_seed(0)
    a = torch.randn(3, 5, 11)
    assert forward_kl_per_token(a, a).abs().max() < 1e-6
    b = torch.randn(3, 5, 11)
    assert (forward_kl_per_token(a, b) >= -1e-7).all()


def test_cross_entropy_matches_log_softmax_and_ignores() -> None:
    logits = torch.tensor([[[0.0, math.log(3.0)], [1.0, 1.0]]])
    targets = torch.tensor([[1, IGNORE_INDEX]])
    ce = cross_entropy_per_token(logits, targets)
    assert abs(ce[0, 0].item() - (-math.log(0.75))) < 1e-6
    assert ce[0, 1].item() == 0.0


def test_reduce_masked_all_masked_is_zero_not_nan() -> None:
    per_token = torch.full((2, 3), float("nan"))
    mask = torch.zeros(2, 3, dtype=torch.bool)
    out = reduce_masked(per_token, mask, mask.sum())
    assert out.item() == 0.0


def test_masked_positions_get_zero_gradient() -> None:
    torch.manual_seed(0)
    student = torch.randn(1, 4, 7, requires_grad=True)
    teacher = torch.randn(1, 4, 7)
    labels = torch.tensor([[1, 2, 3, 4]])
    attn = torch.tensor([[1, 1, 1, 0]])  # last token is padding
    s, targets, valid = shift_for_next_token(student, labels, attn)
    loss = reduce_masked(forward_kl_per_token(s, teacher[:, :-1]), valid, valid.sum())
    loss = loss + reduce_masked(cross_entropy_per_token(s, targets), valid, valid.sum())
    loss.backward()
    assert valid.tolist() == [[True, True, False]]
    assert student.grad[0, 2].abs().sum() == 0  # predicts the padded token
    assert student.grad[0, 3].abs().sum() == 0  # last position predicts nothing
    assert student.grad[0, 0].abs().sum() > 0


def test_reducer_divides_by_supplied_count() -> None:
    per_token = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    mask = torch.tensor([[True, False], [True, True]])
    assert reduce_masked(per_token, mask, 8).item() == (1 + 3 + 4) / 8
