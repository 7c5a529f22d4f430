"""The one copy of perplexity, KL and top-1: checked against hand computations and against
torch's own cross_entropy / kl_div and transformers' loss, never against itself."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from distill.metrics import (
    ScoreSums,
    TeacherSide,
    blocks_problem,
    perplexity,
    perplexity_from,
    score_blocks,
    score_logits,
    score_positions,
    teacher_sides,
)
from distill.quantize.parity import compare
from tests.conftest import tiny_llama

VOCAB = 50


# --------------------------------------------------------------------------------------------
# score_logits on hand-made tensors
# --------------------------------------------------------------------------------------------


def test_identical_logits_have_zero_kl_and_full_agreement() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    tokens = torch.randint(0, 7, (2, 5))
    sums = score_logits(logits, logits.clone(), tokens)
    assert sums.num_tokens == 2 * 4  # T - 1 positions per row
    assert sums.kl == pytest.approx(0.0, abs=1e-6)
    assert sums.top1 == 1.0


def test_uniform_logits_have_perplexity_equal_to_vocab_size() -> None:
    tokens = torch.randint(0, 11, (3, 6))
    sums = score_logits(torch.zeros(3, 6, 11), torch.randn(3, 6, 11), tokens)
    assert sums.perplexity == pytest.approx(11.0, rel=1e-6)


def test_hand_computed_ce_kl_and_top1() -> None:
    # Two scored positions (T = 3), vocabulary of 2.
    model = torch.tensor([[[0.0, 0.0], [2.0, 0.0], [9.0, 9.0]]])
    teacher = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0], [5.0, 1.0]]])
    tokens = torch.tensor([[0, 1, 0]])
    sums = score_logits(model, teacher, tokens)

    # CE: position 0 (uniform) predicts token 1 -> ln 2; position 1 predicts token 0 under
    # softmax(2, 0) -> -ln(e^2 / (e^2 + 1)). The last position has no next token.
    ce1 = -math.log(math.exp(2.0) / (math.exp(2.0) + 1.0))
    assert sums.ce_sum == pytest.approx(math.log(2.0) + ce1, rel=1e-6)
    assert sums.perplexity == pytest.approx(math.exp((math.log(2.0) + ce1) / 2), rel=1e-6)
    # KL(teacher || model): position 0 p = (1/4, 3/4) vs (1/2, 1/2); position 1 p uniform.
    kl0 = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    q1 = torch.softmax(torch.tensor([2.0, 0.0]), -1).tolist()
    kl1 = 0.5 * math.log(0.5 / q1[0]) + 0.5 * math.log(0.5 / q1[1])
    assert sums.kl == pytest.approx((kl0 + kl1) / 2, rel=1e-5)
    # Top-1: position 0 model argmax 0 (tie -> first) vs teacher 1; position 1 both 0.
    assert sums.top1_matches == 1
    assert sums.num_tokens == 2


def test_teacher_zero_probability_gives_finite_kl() -> None:
    teacher = torch.tensor([[[0.0, float("-inf")], [0.0, 0.0]]])
    sums = score_logits(torch.zeros(1, 2, 2), teacher, torch.tensor([[0, 1]]))
    assert math.isfinite(sums.kl)
    assert sums.kl == pytest.approx(math.log(2.0), rel=1e-6)


def test_model_zero_probability_where_the_teacher_has_none_adds_nothing() -> None:
    # The model gives token 1 probability 0 (log -inf) where the teacher does too: the term is
    # 0, not 0 * -inf = NaN; where the teacher gives it mass, KL is infinite.
    teacher = TeacherSide.of([torch.tensor([[0.0, float("-inf")], [math.log(0.5)] * 2])])
    model = torch.tensor([[0.0, float("-inf")], [0.0, float("-inf")]])
    assert torch.isfinite(teacher.neg_entropy).all()  # kept finite, not recomputed per model
    kl = teacher.kl(model)
    assert kl[0] == 0.0 and kl[1] == math.inf
    sums = score_positions(model[:1], teacher[:1], torch.tensor([0]))
    assert sums.kl == 0.0 and sums.top1 == 1.0
    # A NaN of the model's own still shows.
    assert math.isnan(float(teacher.kl(torch.tensor([[float("nan"), 0.0]] * 2))[0]))


def test_teacher_side_kl_matches_kl_div_at_a_real_vocabulary_scale() -> None:
    # One product-sum against the teacher's kept probabilities instead of kl_div: the two
    # agree (in fp32, over 49k tokens with peaked distributions) to float rounding.
    g = torch.Generator().manual_seed(8)
    t = F.log_softmax(torch.randn(64, 49152, generator=g) * 4, -1)
    m = F.log_softmax(torch.randn(64, 49152, generator=g) * 4, -1)
    exact = F.kl_div(m.double(), t.double(), log_target=True, reduction="none").sum(-1)
    got = TeacherSide.of(list(t.split(16))).kl(m).double()
    assert float((got - exact).abs().max()) < 1e-4 * float(exact.abs().max())
    assert float(got.mean()) == pytest.approx(float(exact.mean()), rel=1e-6)


def test_sums_over_batches_equal_one_big_batch() -> None:
    torch.manual_seed(1)
    logits, teacher = torch.randn(4, 6, 9), torch.randn(4, 6, 9)
    tokens = torch.randint(0, 9, (4, 6))
    whole = score_logits(logits, teacher, tokens)
    parts = score_logits(logits[:1], teacher[:1], tokens[:1]) + score_logits(
        logits[1:], teacher[1:], tokens[1:]
    )
    assert parts.num_tokens == whole.num_tokens
    assert parts.ce_sum == pytest.approx(whole.ce_sum, rel=1e-6)
    assert parts.kl_sum == pytest.approx(whole.kl_sum, rel=1e-6)
    assert parts.top1_matches == whole.top1_matches


def test_score_logits_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        score_logits(torch.zeros(1, 3, 5), torch.zeros(1, 3, 6), torch.zeros(1, 3).long())
    with pytest.raises(ValueError, match="at least 2 tokens"):
        score_logits(torch.zeros(1, 1, 5), torch.zeros(1, 1, 5), torch.zeros(1, 1).long())


def test_empty_sums_are_nan_not_a_crash() -> None:
    assert math.isnan(ScoreSums().perplexity)


def test_huge_cross_entropy_gives_inf_perplexity_not_a_crash() -> None:
    # exp(800) is past float range: math.exp raised OverflowError, ending a whole evaluate
    # (or training's eval) at the last variant; a broken model must show up as inf.
    assert ScoreSums(ce_sum=1600.0, num_tokens=2).perplexity == math.inf
    assert perplexity_from(1600.0, 2) == math.inf
    assert math.isnan(perplexity_from(math.nan, 2))
    logits = torch.zeros(1, 2, 3)
    logits[0, 0, 0] = 2000.0  # the target, token 1, gets log-probability -2000
    sums = score_logits(logits, logits, torch.tensor([[0, 1]]))
    assert sums.mean_ce == pytest.approx(2000.0) and sums.perplexity == math.inf


# --------------------------------------------------------------------------------------------
# Against torch's and transformers' own formulas
# --------------------------------------------------------------------------------------------


def _by_torch(logits: torch.Tensor, teacher: torch.Tensor, tokens: torch.Tensor):
    """Mean CE, mean KL(teacher || model) and top-1 from torch.nn.functional's formulas."""
    v = logits.shape[-1]
    s, t = logits[:, :-1].reshape(-1, v).double(), teacher[:, :-1].reshape(-1, v).double()
    ce = F.cross_entropy(s, tokens[:, 1:].reshape(-1))
    # kl_div(input=log q, target=log p, log_target) = sum p (log p - log q): KL(p || q).
    kl = F.kl_div(
        F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean"
    )
    top1 = (s.argmax(-1) == t.argmax(-1)).double().mean()
    return float(ce), float(kl), float(top1)


def test_score_logits_matches_torch_cross_entropy_and_kl_div() -> None:
    g = torch.Generator().manual_seed(4)
    logits, teacher = torch.randn(3, 7, 11, generator=g) * 3, torch.randn(3, 7, 11, generator=g)
    tokens = torch.randint(0, 11, (3, 7), generator=g)
    ce, kl, top1 = _by_torch(logits, teacher, tokens)
    sums = score_logits(logits, teacher, tokens)
    assert sums.mean_ce == pytest.approx(ce, rel=1e-5)
    assert sums.perplexity == pytest.approx(math.exp(ce), rel=1e-5)
    assert sums.kl == pytest.approx(kl, rel=1e-5)
    assert sums.top1 == pytest.approx(top1)


@pytest.fixture(scope="module")
def tiny_pair():
    return tiny_llama(VOCAB, layers=2, seed=0), tiny_llama(VOCAB, layers=1, seed=1)


@pytest.fixture(scope="module")
def blocks() -> torch.Tensor:
    # Five blocks in batches of two leave a short last batch: per-token weighting matters.
    return torch.randint(0, VOCAB, (5, 9), generator=torch.Generator().manual_seed(2))


def test_perplexity_matches_transformers_loss(tiny_pair, blocks: torch.Tensor) -> None:
    _, model = tiny_pair
    with torch.no_grad():
        loss = model(input_ids=blocks, labels=blocks).loss  # mean over all 5 x 8 positions
    assert perplexity(model, blocks, batch_size=2) == pytest.approx(math.exp(loss), rel=1e-5)


def test_perplexity_restores_train_mode_and_rejects_bad_blocks(tiny_pair, blocks) -> None:
    _, model = tiny_pair
    model.train()
    try:
        perplexity(model, blocks, batch_size=2)
        assert model.training
    finally:
        model.eval()
    with pytest.raises(ValueError, match="T >= 2"):
        perplexity(model, blocks[:, :1], batch_size=2)
    assert "batch_size=0" in (blocks_problem(blocks, 0) or "")
    assert "integer token ids" in (blocks_problem(blocks.float(), 2) or "")
    assert blocks_problem(blocks, 2) is None


def test_score_blocks_matches_torch_on_whole_models(tiny_pair, blocks: torch.Tensor) -> None:
    teacher, student = tiny_pair
    reference = teacher_sides(teacher, blocks, batch_size=2)
    assert [len(r) for r in reference] == [2 * 8, 2 * 8, 8]  # T - 1 positions per block
    sums = score_blocks(student, blocks, 2, reference)
    with torch.no_grad():
        ce, kl, top1 = _by_torch(student(blocks).logits, teacher(blocks).logits, blocks)
    assert sums.num_tokens == 5 * 8
    assert sums.mean_ce == pytest.approx(ce, rel=1e-5)
    assert sums.kl == pytest.approx(kl, rel=1e-4)
    assert sums.top1 == pytest.approx(top1)
    # The teacher against itself: KL 0, full agreement, and the reference it hands over.
    kept: list[TeacherSide] = []
    own = score_blocks(teacher, blocks, 2, None, on_reference=kept.append)
    assert own.kl == pytest.approx(0.0, abs=1e-7) and own.top1 == 1.0
    assert all(torch.equal(a.probs, b.probs) for a, b in zip(kept, reference, strict=True))
    with pytest.raises(ValueError, match="same blocks and batch size"):
        score_blocks(student, blocks, 3, reference)


def test_parity_figures_match_torch() -> None:
    g = torch.Generator().manual_seed(5)
    in_memory = torch.randn(2, 6, 13, generator=g)
    reloaded = in_memory + 0.1 * torch.randn(2, 6, 13, generator=g)
    float_logits = torch.randn(2, 6, 13, generator=g)
    ids = torch.randint(0, 13, (2, 6), generator=g)
    figures = compare(reloaded, in_memory, float_logits, ids)
    ce_r, kl_m, _ = _by_torch(reloaded, in_memory, ids)
    ce_f, kl_f, _ = _by_torch(reloaded, float_logits, ids)
    ce_m = float(F.cross_entropy(in_memory[:, :-1].reshape(-1, 13), ids[:, 1:].reshape(-1)))
    ce_float = float(F.cross_entropy(float_logits[:, :-1].reshape(-1, 13), ids[:, 1:].reshape(-1)))
    assert figures["ppl_reloaded"] == pytest.approx(math.exp(ce_r), rel=1e-5)
    assert figures["ppl_in_memory"] == pytest.approx(math.exp(ce_m), rel=1e-5)
    assert figures["ppl_float"] == pytest.approx(math.exp(ce_float), rel=1e-5)
    assert figures["ppl_ratio_to_float"] == pytest.approx(math.exp(ce_r - ce_float), rel=1e-5)
    assert figures["kl_to_in_memory"] == pytest.approx(kl_m, rel=1e-4)
    assert figures["kl_to_float"] == pytest.approx(kl_f, rel=1e-5)
    assert figures["scored_positions"] == 2 * 5
    diff = (reloaded - in_memory)[:, :-1].abs().max()
    assert figures["max_abs_logit_diff"] == pytest.approx(float(diff))


def test_training_quick_eval_reports_these_metrics(tiny_pair, blocks: torch.Tensor) -> None:
    from distill.train.loop import quick_eval

    teacher, student = tiny_pair
    reference = teacher_sides(teacher, blocks, batch_size=2)
    student.train()
    try:
        got = quick_eval(student, blocks, reference, batch_size=2)
        assert student.training  # the loop's mode is restored
    finally:
        student.eval()
    with torch.no_grad():
        ce, kl, top1 = _by_torch(student(blocks).logits, teacher(blocks).logits, blocks)
    assert set(got) == {"val_perplexity", "val_kl_to_teacher", "val_top1_agreement"}
    assert got["val_perplexity"] == pytest.approx(math.exp(ce), rel=1e-5)
    assert got["val_kl_to_teacher"] == pytest.approx(kl, rel=1e-4)
    assert got["val_top1_agreement"] == pytest.approx(top1)


# --------------------------------------------------------------------------------------------
# Masked scoring: completions after prompts, right-padded (distill/evaluate/fidelity.py)
# --------------------------------------------------------------------------------------------


def test_masked_scoring_by_hand_and_all_ones_equals_unmasked() -> None:
    # The hand-computed case above with its first target (token 1 at t = 1) masked out: only
    # position 1 (predicting token 0 under softmax(2, 0)) is left.
    model = torch.tensor([[[0.0, 0.0], [2.0, 0.0], [9.0, 9.0]]])
    teacher = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0], [5.0, 1.0]]])
    tokens = torch.tensor([[0, 1, 0]])
    sums = score_logits(model, teacher, tokens, mask=torch.tensor([[0, 0, 1]]))
    q1 = torch.softmax(torch.tensor([2.0, 0.0]), -1).tolist()
    assert sums.num_tokens == 1
    assert sums.ce_sum == pytest.approx(-math.log(q1[0]), rel=1e-6)
    assert sums.kl == pytest.approx(0.5 * math.log(0.5 / q1[0]) + 0.5 * math.log(0.5 / q1[1]))
    assert sums.top1_matches == 1
    # Column 0 has no predicting position: marking it scores nothing more.
    assert score_logits(model, teacher, tokens, mask=torch.tensor([[1, 0, 1]])) == sums
    g = torch.Generator().manual_seed(6)
    logits, ref = torch.randn(3, 7, 11, generator=g), torch.randn(3, 7, 11, generator=g)
    ids = torch.randint(0, 11, (3, 7), generator=g)
    plain = score_logits(logits, ref, ids)
    ones = score_logits(logits, ref, ids, mask=torch.ones(3, 7))
    assert ones.num_tokens == plain.num_tokens == 3 * 6
    assert ones.ce_sum == pytest.approx(plain.ce_sum, rel=1e-9)
    assert ones.kl_sum == pytest.approx(plain.kl_sum, rel=1e-9)
    assert ones.top1_matches == plain.top1_matches
    with pytest.raises(ValueError, match="mask"):
        score_logits(logits, ref, ids, mask=torch.ones(3, 6))


def test_masked_score_blocks_scores_completions_only(tiny_pair) -> None:
    teacher, student = tiny_pair
    g = torch.Generator().manual_seed(7)
    # Three rows of lengths 9, 6 and 4, right-padded with junk; targets from index 3, 2, 1.
    rows = [torch.randint(0, VOCAB, (n,), generator=g) for n in (9, 6, 4)]
    starts = (3, 2, 1)
    blocks = torch.full((3, 12), 7, dtype=torch.long)
    mask = torch.zeros(3, 12, dtype=torch.long)
    for r, (row, start) in enumerate(zip(rows, starts, strict=True)):
        blocks[r, : len(row)] = row
        mask[r, start : len(row)] = 1
    kept: list[TeacherSide] = []
    own = score_blocks(teacher, blocks, 2, None, mask=mask, on_reference=kept.append)
    assert [k.probs.shape for k in kept] == [(6 + 4, VOCAB), (3, VOCAB)]  # scored ones only
    assert own.kl == pytest.approx(0.0, abs=1e-7) and own.top1 == 1.0
    sums = score_blocks(student, blocks, 2, kept, mask=mask)
    # By hand: each row alone, unpadded, through torch's formulas on its target positions.
    ce = kl = top1 = 0.0
    with torch.no_grad():
        for row, start in zip(rows, starts, strict=True):
            s = F.log_softmax(student(row[None]).logits[0, :-1].double(), -1)[start - 1 :]
            t = F.log_softmax(teacher(row[None]).logits[0, :-1].double(), -1)[start - 1 :]
            ce += float(F.nll_loss(s, row[start:], reduction="sum"))
            kl += float(F.kl_div(s, t, log_target=True, reduction="sum"))
            top1 += float((s.argmax(-1) == t.argmax(-1)).sum())
    assert sums.num_tokens == 13
    assert sums.ce_sum == pytest.approx(ce, rel=1e-5)
    assert sums.kl_sum == pytest.approx(kl, rel=1e-4)
    assert sums.top1_matches == top1
    # An all-ones mask over packed blocks is the unmasked scorer, on the same reference.
    packed = torch.randint(0, VOCAB, (3, 9), generator=g)
    ref = teacher_sides(teacher, packed, 2)
    unmasked = score_blocks(student, packed, 2, ref)
    masked = score_blocks(student, packed, 2, ref, mask=torch.ones_like(packed))
    assert masked.num_tokens == unmasked.num_tokens
    assert masked.ce_sum == pytest.approx(unmasked.ce_sum, rel=1e-6)
    assert masked.kl_sum == pytest.approx(unmasked.kl_sum, rel=1e-5)
    assert masked.top1_matches == unmasked.top1_matches
