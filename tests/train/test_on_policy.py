"""On-policy distillation: which micro-batches, the student's samples as training rows (prompt
tokens and padding get no loss), determinism under a seed, the loss without CE, and λ=1 with
an identical student and teacher giving zero loss."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from distill.config import TrainConfig
from distill.errors import DistillError
from distill.train import loop as train
from distill.train import on_policy
from distill.train.chunked_loss import fused_head
from distill.train.losses import IGNORE_INDEX, KDLoss, scored_positions
from distill.train.on_policy import SampleSettings, is_on_policy, sample_seed, sampled_rows
from distill.train.step import (
    Batch,
    StepContext,
    micro_batch_loss,
    micro_batches_for_step,
    sampled_batch,
    train_step,
)
from tests.conftest import tiny_llama
from tests.train.test_train import tiny_cfg

CPU = torch.device("cpu")
SETTINGS = SampleSettings(prompt_tokens=4, new_tokens=6, temperature=1.0)


def _ctx(student, teacher, *, kd_ratio=0.5, chunk=None) -> StepContext:
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
        teacher_head=fused_head(teacher) if chunk else None,
        sampling=SETTINGS,
    )


def test_on_policy_selection_is_deterministic_and_about_lambda() -> None:
    n = 4000
    for fraction in (0.1, 0.5, 0.9):
        picks = [is_on_policy(0, i, fraction) for i in range(n)]
        assert picks == [is_on_policy(0, i, fraction) for i in range(n)]
        assert abs(sum(picks) / n - fraction) < 0.03, fraction
    assert not any(is_on_policy(0, i, 0.0) for i in range(200))
    assert all(is_on_policy(0, i, 1.0) for i in range(200))
    # Another seed, another pattern; a larger fraction adds micro-batches, never removes one.
    a = [is_on_policy(0, i, 0.5) for i in range(200)]
    assert a != [is_on_policy(1, i, 0.5) for i in range(200)]
    b = [is_on_policy(0, i, 0.7) for i in range(200)]
    assert all(y for x, y in zip(a, b, strict=True) if x)


def test_micro_batches_for_step_marks_on_policy_ones_with_their_prompts() -> None:
    blocks = torch.arange(20 * 12).view(20, 12)
    cfg = TrainConfig(batch_size=2, grad_accum_steps=4, on_policy_fraction=0.5, seed=3)
    off = micro_batches_for_step(
        blocks, TrainConfig(batch_size=2, grad_accum_steps=4, seed=3), 5, 0, 1, CPU
    )
    got = micro_batches_for_step(blocks, cfg, 5, 0, 1, CPU)
    again = micro_batches_for_step(blocks, cfg, 5, 0, 1, CPU)
    expected = [is_on_policy(3, 5 * 4 + k, 0.5) for k in range(4)]
    assert [b.sample_seed is not None for b in got] == expected
    for k, (b, plain) in enumerate(zip(got, off, strict=True)):
        if expected[k]:
            # The prompt is the start of the very block the off-policy batch would train on.
            assert torch.equal(b.input_ids, plain.input_ids[:, : cfg.sample_prompt_tokens])
            assert b.sample_seed == sample_seed(3, 5, k, 0) == again[k].sample_seed
        else:
            assert torch.equal(b.input_ids, plain.input_ids) and b.sample_seed is None
    # Each process samples under its own seed; all make the same on-policy choice.
    rank1 = micro_batches_for_step(blocks, cfg, 5, 1, 2, CPU)
    assert [b.sample_seed is not None for b in rank1] == expected
    assert all(
        b.sample_seed != c.sample_seed for b, c in zip(got, rank1, strict=True) if c.sample_seed
    )


def test_sampled_rows_layout(monkeypatch) -> None:
    # Completions of different lengths (the second stopped at EOS = 9) laid out exactly.
    monkeypatch.setattr(on_policy, "generate", lambda *a, **k: [(5, 6, 7), (8, 9)])
    prompts = torch.tensor([[1, 2, 3, 4], [11, 12, 13, 14]])
    ids, labels, mask = sampled_rows(tiny_llama(64), prompts, SETTINGS, seed=0)
    assert ids[:, :4].tolist() == prompts.tolist()
    assert ids[0, 4:].tolist() == [5, 6, 7] and ids[1, 4:6].tolist() == [8, 9]
    x = IGNORE_INDEX
    assert labels.tolist() == [[x, x, x, x, 5, 6, 7], [x, x, x, x, 8, 9, x]]
    assert mask.tolist() == [[1] * 7, [1] * 6 + [0]]
    # Scored: exactly the positions that predict a sampled token, none for prompt tokens.
    valid = scored_positions(labels, mask)
    assert valid.tolist() == [[0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 0]]


def test_sampling_is_deterministic_under_its_seed_and_leaves_the_rng_alone() -> None:
    student = tiny_llama(64, layers=2, seed=0).train()
    ctx = _ctx(student, tiny_llama(64, layers=2, seed=1))
    prompts = torch.randint(0, 64, (3, 4))
    rng = torch.get_rng_state()
    a = sampled_batch(ctx, Batch(prompts, prompts, sample_seed=7))
    assert torch.equal(torch.get_rng_state(), rng)  # resume replays the same draws after it
    b = sampled_batch(ctx, Batch(prompts, prompts, sample_seed=7))
    c = sampled_batch(ctx, Batch(prompts, prompts, sample_seed=8))
    assert a.on_policy and torch.equal(a.input_ids, b.input_ids)
    assert not torch.equal(a.input_ids, c.input_ids)
    assert torch.equal(a.input_ids[:, :4], prompts)
    assert (a.labels[:, :4] == IGNORE_INDEX).all()
    assert student.training  # generate switched to eval and back


def test_the_student_samples_its_own_micro_batches_not_the_teacher() -> None:
    """What makes it on-policy: the rows are what the *student* writes under the micro-batch's
    seed (the teacher, here a different model, writes other tokens under the same seed)."""
    from distill.sampling import generate

    student = tiny_llama(64, layers=2, seed=0, tie=False).train()
    teacher = tiny_llama(64, layers=2, seed=1, tie=False)
    ctx = _ctx(student, teacher)
    prompts = torch.randint(0, 64, (3, 4), generator=torch.Generator().manual_seed(2))
    got = sampled_batch(ctx, Batch(prompts, prompts, sample_seed=11))

    def written_by(model) -> list[tuple[int, ...]]:
        return generate(
            model,
            prompts.tolist(),
            max_new_tokens=SETTINGS.new_tokens,
            temperature=SETTINGS.temperature,
            seed=11,
            batch_size=prompts.shape[0],
        )

    by_student, by_teacher = written_by(student), written_by(teacher)
    assert by_student != by_teacher  # the two models tell apart under one seed
    pairs = zip(got.input_ids, got.attention_mask, strict=True)
    rows = [tuple(r[4:][m[4:].bool()].tolist()) for r, m in pairs]
    assert rows == by_student


@pytest.mark.parametrize("chunk", [None, 4])
def test_on_policy_loss_is_the_divergence_alone_and_counts_only_sampled_tokens(
    chunk: int | None,
) -> None:
    student = tiny_llama(64, layers=2, seed=0).train()
    ctx = _ctx(student, tiny_llama(64, layers=2, seed=1), kd_ratio=0.3, chunk=chunk)
    prompts = torch.randint(0, 64, (2, 4))
    sampled = sampled_batch(ctx, Batch(prompts, prompts, sample_seed=1))
    n = int(scored_positions(sampled.labels, sampled.attention_mask).sum())
    loss, parts = micro_batch_loss(ctx, sampled, torch.tensor(float(n)))
    assert parts["ce"] == 0.0 and parts["kd"] > 0
    assert loss.item() == pytest.approx(0.3 * parts["kd"], rel=1e-6)
    metrics = train_step(ctx, [Batch(prompts, prompts, sample_seed=1)], lr=1e-3, step=0)
    assert metrics["tokens"] == n  # the window's normaliser: exactly the sampled positions
    assert metrics["sample_s"] > 0 and metrics["update_s"] > 0


@pytest.mark.parametrize("chunk", [None, 4])
def test_lambda_one_with_identical_student_and_teacher_gives_zero_loss(chunk: int | None) -> None:
    teacher = tiny_llama(64, layers=2, seed=1)
    student = copy.deepcopy(teacher).train()
    ctx = _ctx(student, teacher, chunk=chunk)
    blocks = torch.randint(0, 64, (8, 10))
    cfg = TrainConfig(
        batch_size=2, grad_accum_steps=2, on_policy_fraction=1.0, sample_prompt_tokens=4
    )
    micro = micro_batches_for_step(blocks, cfg, 0, 0, 1, CPU)
    assert all(b.sample_seed is not None for b in micro)
    metrics = train_step(ctx, micro, lr=1e-3, step=0)
    assert metrics["tokens"] > 0
    assert abs(metrics["loss"]) < 1e-6 and abs(metrics["kd"]) < 1e-6 and metrics["ce"] == 0.0
    assert metrics["grad_norm"] < 1e-5


def test_an_on_policy_batch_without_a_teacher_divergence_is_refused() -> None:
    student = tiny_llama(64, layers=2, seed=0)
    ctx = _ctx(student, None, kd_ratio=0.0)
    prompts = torch.randint(0, 64, (2, 4))
    sampled = sampled_batch(ctx, Batch(prompts, prompts, sample_seed=1))
    with pytest.raises(DistillError, match="online teacher's divergence"):
        micro_batch_loss(ctx, sampled, torch.tensor(4.0))
    ctx.sampling = None
    with pytest.raises(DistillError, match="StepContext.sampling"):
        sampled_batch(ctx, Batch(prompts, prompts, sample_seed=1))


ON_POLICY_RUN = [
    "loss.kd_ratio=0.5",  # a blend, so the CE part of the off-policy steps shows
    "train.on_policy_fraction=0.5",
    "train.sample_prompt_tokens=4",
    "train.sample_tokens=6",
    "loss.hidden_weight=0.5",
    "loss.hidden_loss=mse",
]


def test_a_tiny_run_with_on_policy_and_hidden_states_logs_its_parts(
    tmp_path: Path, tiny_teacher_dir, tiny_corpus_dir, monkeypatch
) -> None:
    cfg = tiny_cfg(tiny_teacher_dir, tiny_corpus_dir, tmp_path / "cache", ON_POLICY_RUN)
    straight = tmp_path / "straight"
    train.run(cfg, straight)
    rows = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    expected = [is_on_policy(cfg.train.seed, i, 0.5) for i in range(4)]
    assert any(expected) and not all(expected)  # the seed gives both kinds in 4 steps
    for row, on in zip(rows, expected, strict=True):
        assert {"sample_s", "update_s", "hidden"} <= row.keys()
        assert row["hidden"] > 0 and row["update_s"] > 0
        # No CE on the student's own samples; only sampling steps spend time sampling.
        assert (row["ce"] == 0.0) == on
        assert (row["sample_s"] > 0) == on, row
        assert row["loss"] == pytest.approx(
            0.5 * row["ce"] + 0.5 * row["kd"] + 0.5 * row["hidden"], rel=1e-5
        )

    # Resume after step 2 in fresh objects: the same samples, so the same weights and losses.
    interrupted = tmp_path / "interrupted"
    train.run(cfg, interrupted)
    shutil.rmtree(interrupted / "checkpoints" / "step-000004")
    shutil.rmtree(interrupted / "final")
    resumed = tiny_cfg(
        tiny_teacher_dir, tiny_corpus_dir, tmp_path / "cache", [*ON_POLICY_RUN, "train.resume=auto"]
    )
    train.run(resumed, interrupted)
    a = load_file(str(straight / "final" / "model.safetensors"))
    b = load_file(str(interrupted / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    lines = (interrupted / "metrics.jsonl").read_text().splitlines()
    again = [r for r in map(json.loads, lines) if r["kind"] == "train"]
    assert [r["loss"] for r in again[-2:]] == [r["loss"] for r in rows[-2:]]


def test_sampling_with_sharded_weights_is_refused_before_any_step() -> None:
    from accelerate.utils import DistributedType

    for kind in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        with pytest.raises(DistillError, match="lockstep.*DDP.*on_policy_fraction=0"):
            on_policy.check_sampling_supported(kind)
    on_policy.check_sampling_supported(DistributedType.MULTI_GPU)  # DDP: each rank alone
    on_policy.check_sampling_supported(DistributedType.NO)
