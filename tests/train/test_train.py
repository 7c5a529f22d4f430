"""The loop on a microscopic teacher: files written, exact resume, a finished run dir left
alone, accumulation, NaN guard."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from distill.config import TrainConfig, to_pipeline_config
from distill.data import prepare_data
from distill.errors import DistillError
from distill.models import load_teacher
from distill.run_dir import RunDir
from distill.train import loop as train
from distill.train import step as train_step_module
from distill.train.checkpoint import complete_checkpoints
from distill.train.losses import KDLoss
from distill.train.run_state import config_fingerprint
from distill.train.step import Batch, NonFiniteError, StepContext, lr_at, train_step
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


def spy_steps(monkeypatch) -> list[int]:
    """The 0-based steps the loop runs from now on (``train_step`` calls)."""
    steps: list[int] = []
    real = train.train_step

    def counting(ctx, micro, lr, step):
        steps.append(step)
        return real(ctx, micro, lr, step)

    monkeypatch.setattr(train, "train_step", counting)
    return steps


def logged_train_steps(run_dir: Path, after_line: int = 0) -> list[int]:
    """Steps of the ``train`` rows that metrics.jsonl gained after its first ``after_line``."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()[after_line:]
    return [r["step"] for r in map(json.loads, lines) if r["kind"] == "train"]


def test_resume_reaches_identical_weights(
    tmp_path: Path, tiny_teacher_dir, tiny_corpus_dir, monkeypatch
) -> None:
    cfg = tiny_cfg(tiny_teacher_dir, tiny_corpus_dir, tmp_path / "cache")
    straight = tmp_path / "straight"
    train.run(cfg, straight)

    # Same run interrupted after step 2: drop what came later, resume in fresh objects.
    interrupted = tmp_path / "interrupted"
    train.run(cfg, interrupted)
    shutil.rmtree(interrupted / "checkpoints" / "step-000004")
    shutil.rmtree(interrupted / "final")
    resumed_cfg = tiny_cfg(
        tiny_teacher_dir, tiny_corpus_dir, tmp_path / "cache", ["train.resume=auto"]
    )
    lines_before = len((interrupted / "metrics.jsonl").read_text().splitlines())
    steps = spy_steps(monkeypatch)
    train.run(resumed_cfg, interrupted)
    # Only the remaining steps ran (a run from scratch would also match the weights).
    assert steps == [2, 3]
    assert logged_train_steps(interrupted, lines_before) == [3, 4]

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
        max_grad_norm=1.0,
        kd_loss=KDLoss("forward_kl", temperature=2.0),
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
    real = train_step_module.micro_batch_loss

    def poisoned(ctx, batch, num_tokens):
        loss, parts = real(ctx, batch, num_tokens)
        return loss * bad, {**parts, "loss": parts["loss"] * bad}

    monkeypatch.setattr(train_step_module, "micro_batch_loss", poisoned)
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


def test_a_finished_run_dir_is_not_trained_again(
    tmp_path: Path, tiny_teacher_dir, tiny_corpus_dir, monkeypatch, caplog
) -> None:
    # scripts/pipeline.py run_dir=<run> after scripts/distill.py: the same config again.
    cfg = tiny_cfg(tiny_teacher_dir, tiny_corpus_dir, tmp_path / "cache")
    run_dir = tmp_path / "run"
    train.run(cfg, run_dir)
    weights = run_dir / "final" / "model.safetensors"
    metrics = (run_dir / "metrics.jsonl").read_text()
    mtime = weights.stat().st_mtime_ns
    steps = spy_steps(monkeypatch)
    with caplog.at_level(logging.INFO, logger="distill.train.loop"):
        assert train.run(cfg, run_dir) == run_dir / "final"
    assert steps == []
    assert (run_dir / "metrics.jsonl").read_text() == metrics
    assert weights.stat().st_mtime_ns == mtime
    assert f"train: {run_dir / 'final'} already holds this config's student" in caplog.text

    # Another config would overwrite it: refused, naming the ways out; nothing trained.
    other = tiny_cfg(tiny_teacher_dir, tiny_corpus_dir, tmp_path / "cache", ["train.lr=0.01"])
    with pytest.raises(DistillError, match="another pair/data/loss/train config") as err:
        train.run(other, run_dir)
    assert "new run dir" in str(err.value) and "delete" in str(err.value)
    assert steps == [] and weights.stat().st_mtime_ns == mtime


def test_a_run_trained_on_two_processes_is_finished_for_one(
    tmp_path: Path, tiny_teacher_dir, tiny_corpus_dir
) -> None:
    # accelerate launch (2 processes, batch 1 each) saves batch_size=1 in config.yaml; a
    # one-process scripts/pipeline.py run_dir=<run> must see that run as finished.
    run_dir = tmp_path / "run"
    train.run(tiny_cfg(tiny_teacher_dir, tiny_corpus_dir, tmp_path / "cache"), run_dir)
    newest = complete_checkpoints(run_dir / "checkpoints")[-1] / "trainer_state.json"
    state = json.loads(newest.read_text())
    # What two processes of batch 1 write: the same global batch of 2, on 2 processes.
    per_process = tiny_cfg(
        tiny_teacher_dir, tiny_corpus_dir, tmp_path / "cache", ["train.batch_size=1"]
    )
    assert state["config_fingerprint"] == config_fingerprint(per_process, 2)
    newest.write_text(json.dumps({**state, "num_processes": 2}))
    done = train.finished_state(per_process, RunDir(run_dir))
    assert done is not None and done.step == 4


def test_a_run_trains_on_the_teachers_own_text(
    tmp_path: Path, tiny_teacher_dir, tiny_corpus_dir, monkeypatch
) -> None:
    extra = [
        "data.teacher_generated_fraction=0.5",
        "data.generated_prompts=6",
        "data.generated_tokens=12",
        "data.generated_prompt_tokens=6",
    ]
    cfg = tiny_cfg(tiny_teacher_dir, tiny_corpus_dir, tmp_path / "cache", extra)
    seen: list[torch.Tensor] = []
    real = train.micro_batches_for_step

    def spy(blocks, *args, **kwargs):
        seen.append(blocks)
        return real(blocks, *args, **kwargs)

    monkeypatch.setattr(train, "micro_batches_for_step", spy)
    train.run(cfg, tmp_path / "run")
    (cached,) = (tmp_path / "cache" / "teacher_text").iterdir()
    samples = json.loads((cached / "samples.json").read_text())
    assert len(samples) == 6
    blocks = seen[0]
    # Half the blocks hold the teacher's samples: each sample's prompt appears in them.
    stream = blocks.flatten().tolist()
    text = " ".join(map(str, stream))
    # (the last sample may fall in the dropped tail)
    assert all(" ".join(map(str, s["prompt"] + s["completion"])) in text for s in samples[:-1])
    tokenizer = load_teacher(cfg.pair.teacher, tmp_path)[1]
    corpus = prepare_data(cfg.data, tokenizer, None)
    corpus_rows = {tuple(r) for r in corpus.train.tolist()}
    from_corpus = sum(tuple(r) in corpus_rows for r in blocks.tolist())
    assert from_corpus == blocks.shape[0] // 2


def test_shard_placement_without_a_sharding_launch_fails_before_weights_load(
    tmp_path: Path, tiny_teacher_dir, tiny_corpus_dir, monkeypatch: pytest.MonkeyPatch
) -> None:
    """teacher_placement=shard on a plain launch would replicate the teacher and say nothing."""
    from tests.test_pipeline import no_weights_loaded

    cfg = tiny_cfg(
        tiny_teacher_dir, tiny_corpus_dir, tmp_path / "cache", ["train.teacher_placement=shard"]
    )
    no_weights_loaded(monkeypatch)
    with pytest.raises(DistillError) as err:
        train.run(cfg, tmp_path / "run")
    message = str(err.value)
    assert "train.teacher_placement=shard" in message and "shards no weights" in message
    assert "configs/accelerate/fsdp.yaml" in message and "teacher_placement=replicate" in message
    assert not (tmp_path / "run" / "student_init").exists()
