"""The promises of shared/RELIABILITY.md that test_train.py does not already hold.

Row numbers refer to that table: 1-2 exact resume and data order (across an epoch too),
3 RNG state, 4 crash-safe checkpoints, 6 clean out-of-memory, 8 no pickle on resume,
10 same seed, same trajectory. Rows 5 and 10's accumulation case are in test_train.py,
7 in test_config.py/test_models.py, 9 in test_models.py, 11 in test_data.py, 12 in
test_publish.py.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from distill.config import to_pipeline_config
from distill.train import checkpoint
from distill.train import loop as train
from distill.train.checkpoint import (
    CheckpointError,
    capture_rng,
    complete_checkpoints,
    load_checkpoint,
    restore_rng,
)
from distill.train.step import OutOfMemory
from tests.conftest import compose, tiny_llama, tiny_overrides


def cfg_for(teacher: Path, corpus: Path, cache: Path, extra: list[str] = ()):
    return to_pipeline_config(compose(tiny_overrides(teacher, corpus, cache) + list(extra)))


def record_batches(monkeypatch) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    real = train.micro_batches_for_step

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.extend(b.input_ids.clone() for b in out)
        return out

    monkeypatch.setattr(train, "micro_batches_for_step", spy)
    return seen


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "model.safetensors"))


# Block 64 over the tiny corpus leaves ~20 train blocks: batch 8 makes an epoch 2 steps, so
# 6 steps cross two epoch boundaries and the resume point (step 2) sits on one.
ACROSS_EPOCHS = [
    "data.block_size=64",
    "train.batch_size=8",
    "train.max_steps=6",
    "train.keep_last_n_checkpoints=5",
]


@pytest.mark.parametrize("extra", [[], ACROSS_EPOCHS], ids=["mid-epoch", "across-epochs"])
def test_resume_restores_weights_and_data_order(
    extra, tmp_path: Path, tiny_teacher_dir, tiny_corpus_dir, monkeypatch
) -> None:
    cache = tmp_path / "cache"
    cfg = cfg_for(tiny_teacher_dir, tiny_corpus_dir, cache, extra)
    seen_straight = record_batches(monkeypatch)
    train.run(cfg, tmp_path / "straight")
    monkeypatch.undo()

    interrupted = tmp_path / "interrupted"
    train.run(cfg, interrupted)
    for ckpt in complete_checkpoints(interrupted / "checkpoints")[1:]:
        shutil.rmtree(ckpt)
    shutil.rmtree(interrupted / "final")
    assert [p.name for p in complete_checkpoints(interrupted / "checkpoints")] == ["step-000002"]
    seen_resumed = record_batches(monkeypatch)
    train.run(
        cfg_for(tiny_teacher_dir, tiny_corpus_dir, cache, [*extra, "train.resume=auto"]),
        interrupted,
    )

    # The resumed run sees exactly the batches the straight run saw after step 2.
    per_step = len(seen_straight) // cfg.train.max_steps
    assert len(seen_resumed) == len(seen_straight) - 2 * per_step
    for a, b in zip(seen_straight[2 * per_step :], seen_resumed, strict=True):
        assert torch.equal(a, b)
    a, b = final_weights(tmp_path / "straight"), final_weights(interrupted)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def dropout_teacher_dir(tmp_path_factory, tokenizer) -> Path:
    """The tiny teacher with attention dropout, which the student inherits: its training
    steps then draw from the global torch RNG."""
    folder = tmp_path_factory.mktemp("dropout_teacher")
    model = tiny_llama(len(tokenizer), layers=4)
    model.config.attention_dropout = 0.5
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def test_resume_restores_the_rng_that_dropout_draws_from(
    tmp_path: Path, dropout_teacher_dir, tiny_corpus_dir
) -> None:
    cache = tmp_path / "cache"
    cfg = cfg_for(dropout_teacher_dir, tiny_corpus_dir, cache)
    train.run(cfg, tmp_path / "straight")
    student_config = json.loads((tmp_path / "straight/student_init/config.json").read_text())
    assert student_config["attention_dropout"] == 0.5
    interrupted = tmp_path / "interrupted"
    train.run(cfg, interrupted)
    shutil.rmtree(interrupted / "checkpoints" / "step-000004")
    shutil.rmtree(interrupted / "final")
    resumed = cfg_for(dropout_teacher_dir, tiny_corpus_dir, cache, ["train.resume=auto"])
    train.run(resumed, interrupted)
    # Steps 3-4 see the dropout masks of the straight run only if the RNG came back too.
    a, b = final_weights(tmp_path / "straight"), final_weights(interrupted)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_rng_state_round_trips_and_missing_rng_is_an_error(
    tmp_path: Path, tiny_teacher_dir, tiny_corpus_dir
) -> None:
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    tensors, meta = capture_rng()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(2), np.random.seed(2), random.seed(2)
    restore_rng(tensors, meta)
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], got[0])
    assert np.array_equal(expected[1], got[1]) and expected[2] == got[2]

    cfg = cfg_for(tiny_teacher_dir, tiny_corpus_dir, tmp_path / "cache")
    train.run(cfg, tmp_path / "run")
    ckpt = complete_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    (ckpt / "rng.safetensors").unlink()
    model = tiny_llama(8)
    with pytest.raises(CheckpointError, match="rng.safetensors"):
        load_checkpoint(ckpt, model=model, optimizer=torch.optim.AdamW(model.parameters()))


def test_crash_mid_save_keeps_previous_checkpoint(
    tmp_path: Path, tiny_teacher_dir, tiny_corpus_dir, monkeypatch
) -> None:
    cfg = cfg_for(tiny_teacher_dir, tiny_corpus_dir, tmp_path / "cache")
    run_dir = tmp_path / "run"
    calls = {"n": 0}
    real_save = checkpoint.torch.save

    def failing_save(obj, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint dies after its weights, before the rest
            raise OSError("disk vanished")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", failing_save)
    with pytest.raises(OSError, match="disk vanished"):
        train.run(cfg, run_dir)
    monkeypatch.undo()
    ckpts = run_dir / "checkpoints"
    assert [p.name for p in complete_checkpoints(ckpts)] == ["step-000002"]
    assert any(p.name.startswith(".staging-step-000004") for p in ckpts.iterdir())
    good = ckpts / "step-000002"
    before = {p.name: p.read_bytes() for p in good.iterdir()}
    lines_before = len((run_dir / "metrics.jsonl").read_text().splitlines())
    train.run(
        cfg_for(tiny_teacher_dir, tiny_corpus_dir, tmp_path / "cache", ["train.resume=auto"]),
        run_dir,
    )
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()[lines_before:]
    new_rows = [json.loads(x) for x in lines]
    # Resumed at 2: this invocation logged steps 3 and 4 only (from scratch it would log 1-4).
    assert [r["step"] for r in new_rows if r["kind"] == "train"] == [3, 4]
    assert (run_dir / "final" / "model.safetensors").exists()
    assert before.keys() <= {p.name for p in good.iterdir()} or not good.exists()


def test_keep_last_never_deletes_the_only_checkpoint(tmp_path: Path) -> None:
    model = tiny_llama(16)
    opt = torch.optim.AdamW(model.parameters())
    for step in (1, 2, 3):
        checkpoint.save_checkpoint(
            tmp_path,
            model=model,
            optimizer=opt,
            state=checkpoint.TrainerState(step, 0, "x"),
            keep_last_n=0,
        )
        assert [p.name for p in complete_checkpoints(tmp_path)] == [f"step-{step:06d}"]


def test_out_of_memory_names_the_knobs_and_keeps_checkpoint(
    tmp_path: Path, tiny_teacher_dir, tiny_corpus_dir, monkeypatch
) -> None:
    cfg = cfg_for(tiny_teacher_dir, tiny_corpus_dir, tmp_path / "cache")
    real = train.train_step

    def oom_at_step_3(ctx, micro, lr, step):
        if step == 2:  # 0-based: the third step, after the step-2 checkpoint
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(ctx, micro, lr, step)

    monkeypatch.setattr(train, "train_step", oom_at_step_3)
    with pytest.raises(OutOfMemory) as err:
        train.run(cfg, tmp_path / "run")
    msg = str(err.value)
    for knob in (
        "train.batch_size",
        "loss.chunk_size",
        "train.teacher_mode=cached",
        "train.resume=auto",
    ):
        assert knob in msg
    ckpt = complete_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "student_init")
    state = load_checkpoint(ckpt, model=student, optimizer=torch.optim.AdamW(student.parameters()))
    assert state.step == 2

    def other_error(ctx, micro, lr, step):
        raise ValueError("a real bug")

    monkeypatch.setattr(train, "train_step", other_error)
    with pytest.raises(ValueError, match="a real bug"):
        train.run(cfg, tmp_path / "run2")


def test_resume_refuses_a_pickled_optimizer_payload(
    tmp_path: Path, tiny_teacher_dir, tiny_corpus_dir
) -> None:
    cfg = cfg_for(tiny_teacher_dir, tiny_corpus_dir, tmp_path / "cache")
    train.run(cfg, tmp_path / "run")
    ckpt = complete_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"state": Evil()}, ckpt / "optimizer.pt")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "student_init")
    with pytest.raises(Exception, match="(?i)weights_only|unpickl"):
        load_checkpoint(ckpt, model=model, optimizer=torch.optim.AdamW(model.parameters()))
    assert not marker.exists()


def test_same_seed_same_trajectory(tmp_path: Path, tiny_teacher_dir, tiny_corpus_dir) -> None:
    cfg = cfg_for(tiny_teacher_dir, tiny_corpus_dir, tmp_path / "cache")
    train.run(cfg, tmp_path / "a")
    train.run(cfg, tmp_path / "b")

    def losses(d: Path) -> list[float]:
        rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if r["kind"] == "train"]

    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    a, b = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
