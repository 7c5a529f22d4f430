"""The loop on a microscopic teacher: files written, exact resume, accumulation, NaN guard."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from distill.config import TrainConfig, to_pipeline_config
from distill.train import loop as train
from distill.train.checkpoint import complete_checkpoints
from distill.train.loop import Batch, NonFiniteError, StepContext, lr_at, train_step
from tests.conftest import compose, tiny_llama, tiny_overrides


def tiny_cfg(tiny_teacher_dir: Path, tiny_corpus_dir: Path, cache: Path, extra: list[str] = ()):
    return to_pipeline_config(
        compose(tiny_overrides(tiny_teacher_dir, tiny_corpus_dir, cache) + list(extra))
    )


def test_run_writes_the_expected_files(tmp_path: Path, tiny_teacher_dir, tiny_corpus_dir) -> None:
    cfg = tiny_cfg(tiny_teacher_dir, tiny_corpus_dir, tmp_path / "cache")
    run_dir = tmp_path / "run"
    train.run(cfg, run_dir)
    assert [p.name for p in complete_checkpoints(run_dir / "checkpoints")] == [
        "step-000002",
        "step-000004",
    ]
    for name in (
        "final/model.safetensors",
        "final/config.json",
        "final/tokenizer.json",
        "student_init/model.safetensors",
    ):
        assert (run_dir / name).exists(), name
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    assert all(
        {"ce", "kd", "loss", "lr", "grad_norm", "tokens_per_s"} <= r.keys() for r in train_rows
    )
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [2, 4]
    assert any((run_dir / "tensorboard").iterdir())


def test_resume_reaches_identical_weights(
    tmp_path: Path, tiny_teacher_dir, tiny_corpus_dir
) -> None:
    cfg = tiny_cfg(tiny_teacher_dir, tiny_corpus_dir, tmp_path / "cache")
    straight = tmp_path / "straight"
    train.run(cfg, straight)

    # Same run interrupted after step 2: drop what came later, resume in fresh objects.
    interrupted = tmp_path / "interrupted"
    train.run(cfg, interrupted)
    import shutil

    shutil.rmtree(interrupted / "checkpoints" / "step-000004")
    shutil.rmtree(interrupted / "final")
    resumed_cfg = tiny_cfg(
        tiny_teacher_dir, tiny_corpus_dir, tmp_path / "cache", ["train.resume=auto"]
    )
    train.run(resumed_cfg, interrupted)

    a = load_file(str(straight / "final" / "model.safetensors"))
    b = load_file(str(interrupted / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    losses = lambda d: [  # noqa: E731
        r["loss"]
        for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
        if r["kind"] == "train"
    ]
    assert losses(straight) == losses(interrupted)[:2] + losses(interrupted)[-2:]


def _ctx(model, teacher, kd_ratio=0.5) -> StepContext:
    return StepContext(
        student=model,
        teacher=teacher,
        optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
        accelerator=Accelerator(cpu=True),
        kd_ratio=kd_ratio,
        temperature=2.0,
        scale_by_t2=True,
        max_grad_norm=1.0,
    )


def _padded_batches() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    ids = torch.randint(1, 64, (4, 10))
    lengths = [10, 7, 4, 9]
    mask = torch.zeros(4, 10, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return ids * mask, mask


def test_accumulation_matches_one_big_batch_with_padding() -> None:
    teacher = tiny_llama(64, layers=2, seed=7)
    ids, mask = _padded_batches()
    results = []
    for micro in (4, 1):
        model = tiny_llama(64, layers=2, seed=0).train()
        ctx = _ctx(model, teacher)
        batches = [
            Batch(
                input_ids=ids[i : i + micro],
                labels=ids[i : i + micro],
                attention_mask=mask[i : i + micro],
            )
            for i in range(0, 4, micro)
        ]
        metrics = train_step(ctx, batches, lr=1e-3, step=0)
        results.append((metrics, {k: v.clone() for k, v in model.state_dict().items()}))
    (m_big, w_big), (m_acc, w_acc) = results
    assert abs(m_big["loss"] - m_acc["loss"]) < 1e-5
    assert m_big["tokens"] == m_acc["tokens"] == sum(n - 1 for n in [10, 7, 4, 9])
    for key in w_big:
        assert torch.allclose(w_big[key], w_acc[key], atol=1e-6), key


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_loss_stops_before_optimizer_step(bad: float, monkeypatch) -> None:
    model = tiny_llama(64, layers=2).train()
    ctx = _ctx(model, tiny_llama(64, layers=2, seed=3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    real = train.micro_batch_loss

    def poisoned(ctx, batch, num_tokens):
        loss, parts = real(ctx, batch, num_tokens)
        return loss * bad, {**parts, "loss": parts["loss"] * bad}

    monkeypatch.setattr(train, "micro_batch_loss", poisoned)
    ids = torch.randint(0, 64, (2, 8))
    with pytest.raises(NonFiniteError, match="step 5: loss"):
        train_step(ctx, [Batch(ids, ids)], lr=1e-3, step=5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not ctx.optimizer.state  # never stepped


def test_non_finite_gradient_stops_before_optimizer_step() -> None:
    model = tiny_llama(64, layers=2).train()
    ctx = _ctx(model, model, kd_ratio=0.0)
    model.model.norm.weight.register_hook(lambda g: g * float("nan"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 64, (2, 8))
    with pytest.raises(NonFiniteError, match="step 3: gradient norm is nan"):
        train_step(ctx, [Batch(ids, ids)], lr=1e-3, step=3)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_lr_schedule_is_a_pure_function_of_step() -> None:
    cfg = TrainConfig(max_steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(100, cfg) == pytest.approx(0.1)
    assert lr_at(55, cfg) == pytest.approx(0.55)
