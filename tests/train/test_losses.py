"""Losses against hand-computed values, masking, and the reducer's edge cases."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from distill.config import LossConfig
from distill.names import LOSSES
from distill.train.chunked_loss import chunked_distill_loss, fused_head
from distill.train.losses import (
    DIVERGENCES,
    IGNORE_INDEX,
    KDLoss,
    ProjectedTeacher,
    TopKTeacher,
    cross_entropy_per_token,
    make_kd_loss,
    reduce_masked,
    shift_for_next_token,
)
from tests.conftest import tiny_gpt2, tiny_llama


def per_token(name: str, student, teacher, **settings) -> torch.Tensor:
    """Divergence ``name`` per position ``(B, T)``, as the loop computes it."""
    return KDLoss(name, **settings)(student, teacher)


def forward_kl(student, teacher, **settings) -> torch.Tensor:
    return per_token("forward_kl", student, teacher, **settings)


def test_forward_kl_matches_hand_computed_value() -> None:
    # p = softmax([0, ln 3]) = [1/4, 3/4]; q = softmax([0, 0]) = [1/2, 1/2]
    teacher = torch.tensor([[[0.0, math.log(3.0)]]])
    student = torch.zeros(1, 1, 2)
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    got = forward_kl(student, teacher, temperature=1.0)
    assert got.shape == (1, 1)
    assert abs(got.item() - expected) < 1e-6


def test_temperature_softens_both_and_t2_scales() -> None:
    teacher = torch.tensor([[[0.0, 2.0]]])
    student = torch.tensor([[[1.0, 0.0]]])
    t = 2.0
    plain = forward_kl(student / t, teacher / t, temperature=1.0)
    unscaled = forward_kl(student, teacher, temperature=t, scale_by_t2=False)
    scaled = forward_kl(student, teacher, temperature=t, scale_by_t2=True)
    assert torch.allclose(plain, unscaled)
    assert torch.allclose(scaled, unscaled * t * t)


def test_kl_zero_for_identical_and_non_negative() -> None:
    torch.manual_seed(0)
    a = torch.randn(3, 5, 11)
    assert forward_kl(a, a).abs().max() < 1e-6
    b = torch.randn(3, 5, 11)
    assert (forward_kl(a, b) >= -1e-7).all()


def test_cross_entropy_matches_log_softmax_and_ignores() -> None:
    logits = torch.tensor([[[0.0, math.log(3.0)], [1.0, 1.0]]])
    targets = torch.tensor([[1, IGNORE_INDEX]])
    ce = cross_entropy_per_token(logits, targets)
    assert abs(ce[0, 0].item() - (-math.log(0.75))) < 1e-6
    assert ce[0, 1].item() == 0.0


def test_reduce_masked_all_masked_is_zero_not_nan() -> None:
    values = torch.full((2, 3), float("nan"))
    mask = torch.zeros(2, 3, dtype=torch.bool)
    out = reduce_masked(values, mask, mask.sum())
    assert out.item() == 0.0


def test_masked_positions_get_zero_gradient() -> None:
    torch.manual_seed(0)
    student = torch.randn(1, 4, 7, requires_grad=True)
    teacher = torch.randn(1, 4, 7)
    labels = torch.tensor([[1, 2, 3, 4]])
    attn = torch.tensor([[1, 1, 1, 0]])  # last token is padding
    s, targets, valid = shift_for_next_token(student, labels, attn)
    loss = reduce_masked(forward_kl(s, teacher[:, :-1]), valid, valid.sum())
    loss = loss + reduce_masked(cross_entropy_per_token(s, targets), valid, valid.sum())
    loss.backward()
    assert valid.tolist() == [[True, True, False]]
    assert student.grad[0, 2].abs().sum() == 0  # predicts the padded token
    assert student.grad[0, 3].abs().sum() == 0  # last position predicts nothing
    assert student.grad[0, 0].abs().sum() > 0


def test_reducer_divides_by_supplied_count() -> None:
    values = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    mask = torch.tensor([[True, False], [True, True]])
    assert reduce_masked(values, mask, 8).item() == (1 + 3 + 4) / 8


# --------------------------------------------------------------------------------------------
# The loss family
# --------------------------------------------------------------------------------------------

ALL = list(LOSSES)


def test_loss_names_are_one_list_and_unknown_names_name_the_choices() -> None:
    # names.LOSSES is what loss.name accepts; every one of them has a divergence, no other.
    assert tuple(DIVERGENCES) == LOSSES
    with pytest.raises(ValueError, match="unknown loss 'mse': choose one of forward_kl, "):
        per_token("mse", torch.zeros(1, 1, 2), torch.zeros(1, 1, 2))
    problems = LossConfig(name="mse").problems()
    assert problems == [f"loss.name='mse': choose one of {', '.join(LOSSES)}"]


def _fixed_pair() -> tuple[torch.Tensor, torch.Tensor]:
    # p_t = softmax([0, ln 3]) = [1/4, 3/4]; p_s = softmax([0, 0]) = [1/2, 1/2]
    return torch.zeros(1, 1, 2), torch.tensor([[[0.0, math.log(3.0)]]])


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True) if a > 0)


@pytest.mark.parametrize(
    "name,kwargs,expected",
    [
        ("forward_kl", {}, _kl([0.25, 0.75], [0.5, 0.5])),
        ("reverse_kl", {}, _kl([0.5, 0.5], [0.25, 0.75])),
        ("tvd", {}, 0.25),
        (
            "jsd",
            {"beta": 0.5},
            (0.5 * _kl([0.25, 0.75], [0.375, 0.625]) + 0.5 * _kl([0.5, 0.5], [0.375, 0.625]))
            / 0.25,
        ),
        ("skew_kl", {"alpha": 0.1}, _kl([0.25, 0.75], [0.475, 0.525])),
    ],
)
def test_each_loss_matches_hand_computed_value(name: str, kwargs: dict, expected: float) -> None:
    student, teacher = _fixed_pair()
    got = per_token(name, student, teacher, scale_by_t2=False, **kwargs)
    assert got.shape == (1, 1) and got.dtype == torch.float32
    assert abs(got.item() - expected) < 1e-6


@pytest.mark.parametrize("name", ALL)
def test_each_loss_zero_for_identical_non_negative_and_tempered(name: str) -> None:
    torch.manual_seed(0)
    a, b = torch.randn(3, 5, 11), torch.randn(3, 5, 11) * 3
    fn = functools.partial(per_token, name)
    assert fn(a, a.clone()).abs().max() < 1e-5
    assert (fn(a, b) >= -1e-6).all()
    t = 2.5
    unscaled = fn(a, b, temperature=t, scale_by_t2=False)
    assert torch.allclose(unscaled, fn(a / t, b / t, temperature=1.0, scale_by_t2=False), atol=1e-6)
    assert torch.allclose(fn(a, b, temperature=t, scale_by_t2=True), unscaled * t * t)


def test_jsd_endpoints_are_the_kls_and_limits_are_continuous() -> None:
    torch.manual_seed(1)
    s, t = torch.randn(2, 4, 9), torch.randn(2, 4, 9) * 2
    fkl, rkl = forward_kl(s, t), per_token("reverse_kl", s, t)
    assert torch.equal(per_token("jsd", s, t, beta=0.0), fkl)
    assert torch.equal(per_token("jsd", s, t, beta=1.0), rkl)
    # Continuous at the ends: the gap to each KL shrinks as beta approaches it.
    gaps_f = [(per_token("jsd", s, t, beta=b) - fkl).abs().max() for b in (1e-1, 1e-2, 1e-3)]
    gaps_r = [(per_token("jsd", s, t, beta=1 - b) - rkl).abs().max() for b in (1e-1, 1e-2, 1e-3)]
    assert gaps_f[0] > gaps_f[1] > gaps_f[2] and gaps_r[0] > gaps_r[1] > gaps_r[2]
    assert torch.allclose(per_token("jsd", s, t, beta=1e-3), fkl, rtol=1e-2)
    assert torch.allclose(per_token("jsd", s, t, beta=1 - 1e-3), rkl, rtol=0.1)
    assert torch.equal(per_token("skew_kl", s, t, alpha=0.0), fkl)


@pytest.mark.parametrize("name", ALL)
def test_each_loss_all_masked_is_zero_and_masked_positions_get_no_gradient(name: str) -> None:
    torch.manual_seed(0)
    student = torch.randn(1, 4, 7, requires_grad=True)
    teacher = torch.randn(1, 4, 7)
    losses = per_token(name, student, teacher)
    none = torch.zeros(1, 4, dtype=torch.bool)
    assert reduce_masked(losses, none, none.sum()).item() == 0.0
    mask = torch.tensor([[True, True, False, False]])
    reduce_masked(losses, mask, mask.sum()).backward()
    assert student.grad[0, 2:].abs().sum() == 0
    assert student.grad[0, :2].abs().sum() > 0


@pytest.mark.parametrize("name", ALL)
def test_top_k_equals_full_when_k_is_v_and_is_a_finite_lower_bound_otherwise(name: str) -> None:
    torch.manual_seed(2)
    v = 13
    teacher = torch.randn(2, 3, v) * 2
    fn = functools.partial(per_token, name)
    values, grads = [], []
    for rep in (teacher, TopKTeacher.from_logits(teacher, v, 1.5)):
        student = torch.randn(2, 3, v, generator=torch.Generator().manual_seed(3))
        student.requires_grad_(True)
        out = fn(student, rep, temperature=1.5)
        out.sum().backward()
        values.append(out.detach())
        grads.append(student.grad)
    assert torch.allclose(values[0], values[1], atol=1e-5)
    assert torch.allclose(grads[0], grads[1], atol=1e-5)
    student = torch.randn(2, 3, v, requires_grad=True)
    top4 = fn(student, TopKTeacher.from_logits(teacher, 4, 1.5), temperature=1.5)
    top4.sum().backward()
    assert torch.isfinite(top4).all() and (top4 >= -1e-6).all()
    assert torch.isfinite(student.grad).all()
    # Merging tokens into one bucket can only lose information (data processing).
    assert (top4 <= fn(student, teacher, temperature=1.5) + 1e-5).all()


def test_make_kd_loss_binds_the_configured_settings() -> None:
    torch.manual_seed(4)
    s, t = torch.randn(1, 2, 5), torch.randn(1, 2, 5)
    cfg = LossConfig(name="jsd", beta=0.3, temperature=2.0, scale_by_t2=False)
    expected = per_token("jsd", s, t, beta=0.3, temperature=2.0, scale_by_t2=False)
    assert torch.equal(make_kd_loss(cfg)(s, t), expected)


# --------------------------------------------------------------------------------------------
# Memory-bounded (chunked, fused) form
# --------------------------------------------------------------------------------------------


def _param_grads(model: torch.nn.Module, loss: torch.Tensor) -> list[torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    return list(torch.autograd.grad(loss, params))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("teacher_kind", ["projected", "logits", "top_k"])
def test_chunked_fused_loss_matches_unchunked_values_and_grads(
    arch: str, teacher_kind: str
) -> None:
    make = tiny_llama if arch == "llama" else tiny_gpt2
    student, teacher = make(40, seed=0), make(40, seed=5)
    torch.manual_seed(0)
    ids = torch.randint(0, 40, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    kd = make_kd_loss(LossConfig(name="skew_kl", alpha=0.2, temperature=2.0))
    with torch.no_grad():
        t_out = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    t_logits = t_out.logits[:, :-1]
    t_head = fused_head(teacher)
    assert not isinstance(t_head, str)
    full_rep = {
        "projected": t_logits,
        "logits": t_logits,
        "top_k": TopKTeacher.from_logits(t_logits, 6, 2.0),
    }[teacher_kind]

    logits = student(input_ids=ids, attention_mask=mask).logits
    s, targets, valid = shift_for_next_token(logits, ids, mask)
    n = valid.sum()
    ce = reduce_masked(cross_entropy_per_token(s, targets), valid, n)
    ref = 0.3 * ce + 0.7 * reduce_masked(kd(s, full_rep), valid, n)
    ref_grads = _param_grads(student, ref)

    head = fused_head(student)
    assert not isinstance(head, str)
    out = student(input_ids=ids, attention_mask=mask, output_hidden_states=True, logits_to_keep=1)
    hidden = out.hidden_states[-1][:, :-1][valid]
    rows = {
        "projected": ProjectedTeacher(t_out.hidden_states[-1][:, :-1], *t_head),
        "logits": t_logits,
        "top_k": full_rep,
    }[teacher_kind][valid]
    loss, ce_c, _ = chunked_distill_loss(
        hidden, targets[valid], rows, head=head, kd_loss=kd, kd_ratio=0.7, num_tokens=n,
        chunk_size=4,
    )  # fmt: skip
    assert abs(loss.item() - ref.item()) < 1e-5
    assert abs(ce_c.item() - ce.item()) < 1e-5
    for a, b in zip(ref_grads, _param_grads(student, loss), strict=True):
        assert torch.allclose(a, b, atol=1e-6), (a - b).abs().max()


def test_chunked_loss_on_logits_and_empty_batch() -> None:
    torch.manual_seed(0)
    logits = torch.randn(5, 7, requires_grad=True)
    teacher = torch.randn(5, 7)
    targets = torch.randint(0, 7, (5,))
    kd = make_kd_loss(LossConfig(name="tvd"))
    loss, _, _ = chunked_distill_loss(
        logits, targets, teacher, head=None, kd_loss=kd, kd_ratio=0.5, num_tokens=5, chunk_size=2
    )
    ref = (
        0.5 * cross_entropy_per_token(logits, targets).sum() / 5
        + 0.5 * kd(logits, teacher).sum() / 5
    )
    (g_ref,) = torch.autograd.grad(ref, logits)
    (g,) = torch.autograd.grad(loss, logits)
    assert torch.allclose(loss, ref) and torch.allclose(g, g_ref, atol=1e-7)
    empty = torch.zeros(0, 7, requires_grad=True)
    loss, ce, _ = chunked_distill_loss(
        empty, targets[:0], teacher[:0], head=None, kd_loss=kd, kd_ratio=0.5, num_tokens=0,
        chunk_size=2,
    )  # fmt: skip
    loss.backward()
    assert loss.item() == 0.0 and ce.item() == 0.0


def test_fused_head_refuses_post_processed_logits() -> None:
    model = tiny_llama(40)
    assert not isinstance(fused_head(model), str)
    model.config.final_logit_softcapping = 30.0
    reason = fused_head(model)
    assert isinstance(reason, str) and "final_logit_softcapping" in reason


def test_no_divergence_is_chosen_for_the_user() -> None:
    """A step, the chunked loss and KDLoss itself all need the loss named: none falls back to
    forward KL when it is left out (a run could otherwise train with a loss no one chose)."""
    import inspect

    from distill.train.chunked_loss import chunked_distill_loss
    from distill.train.step import StepContext

    with pytest.raises(TypeError):
        KDLoss()  # type: ignore[call-arg]
    for fn, name in ((StepContext, "kd_loss"), (chunked_distill_loss, "kd_loss")):
        parameter = inspect.signature(fn).parameters[name]
        assert parameter.default is inspect.Parameter.empty, fn
    assert make_kd_loss(LossConfig(name="jsd", beta=0.3)).name == "jsd"
