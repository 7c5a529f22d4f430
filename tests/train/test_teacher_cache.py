"""The cached top-k teacher: content, manifest refusal, extension, and training from it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from distill.config import TrainConfig, to_pipeline_config
from distill.train import loop as train
from distill.train.losses import TopKTeacher
from distill.train.step import micro_batches_for_step
from distill.train.teacher_cache import (
    CacheMismatchError,
    TeacherCache,
    blocks_for_steps,
    build_cache,
    manifest_for,
)
from tests.conftest import compose, tiny_llama, tiny_overrides


def _blocks(n: int = 6, block_size: int = 9) -> torch.Tensor:
    return torch.randint(0, 50, (n, block_size), generator=torch.Generator().manual_seed(0))


def test_cache_rows_are_the_teachers_top_k_and_builds_extend(tmp_path: Path, tokenizer) -> None:
    teacher = tiny_llama(len(tokenizer), seed=1)
    blocks = _blocks()
    manifest = manifest_for(teacher, tokenizer, blocks, top_k=5, temperature=2.0)
    assert manifest.block_size == 9 and manifest.bytes_per_position() == 5 * 4 + 4
    assert build_cache(tmp_path, manifest, teacher, blocks, [4, 1], progress=False) == 2
    assert build_cache(tmp_path, manifest, teacher, blocks, [1, 2], progress=False) == 1
    cache = TeacherCache.open(tmp_path, manifest)
    assert sorted(cache.index) == [1, 2, 4]
    assert cache.missing([0, 1, 2]) == [0]
    got = cache.lookup(torch.tensor([4, 1]), "cpu")
    with torch.no_grad():
        logits = teacher(input_ids=blocks[[4, 1]]).logits[:, :-1]
    want = TopKTeacher.from_logits(logits, 5, 2.0)
    assert got.logprobs.shape == (2, 8, 5) and got.ids.dtype == torch.int64
    assert torch.equal(got.ids, want.ids)
    assert torch.allclose(got.logprobs, want.logprobs, atol=2e-3)  # stored as float16
    assert torch.allclose(got.tail, want.tail)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as under train.mixed_precision=bf16
        assert cache.lookup([2], "cpu").logprobs.dtype == torch.float32


def test_cache_for_another_teacher_or_block_size_is_refused(tmp_path: Path, tokenizer) -> None:
    teacher = tiny_llama(len(tokenizer), seed=1)
    manifest = manifest_for(teacher, tokenizer, _blocks(), top_k=5, temperature=1.0)
    build_cache(tmp_path, manifest, teacher, _blocks(), [0], progress=False)
    other_teacher = manifest_for(
        tiny_llama(len(tokenizer), seed=2), tokenizer, _blocks(), top_k=5, temperature=1.0
    )
    with pytest.raises(CacheMismatchError, match="teacher_weights") as err:
        TeacherCache.open(tmp_path, other_teacher)
    assert err.value.mismatched == ["teacher_weights"]
    other_blocks = manifest_for(teacher, tokenizer, _blocks(block_size=5), top_k=5, temperature=1)
    with pytest.raises(CacheMismatchError, match="block_size is 9 there, 5 here"):
        build_cache(tmp_path, other_blocks, teacher, _blocks(block_size=5), progress=False)


def test_blocks_for_steps_are_the_blocks_the_loop_reads() -> None:
    tc = TrainConfig(max_steps=5, batch_size=2, grad_accum_steps=2, seed=3)
    blocks = torch.zeros(40, 4, dtype=torch.long)
    read = set()
    for step in range(1, 5):
        for rank in range(2):
            for b in micro_batches_for_step(blocks, tc, step, rank, 2, torch.device("cpu")):
                read.update(b.block_ids.tolist())
    assert blocks_for_steps(40, tc, world=2, start_step=1) == sorted(read)
    assert blocks_for_steps(10, tc, world=2, start_step=0) == list(range(10))


def test_cached_run_builds_then_reuses_the_cache_and_refuses_a_foreign_one(
    tmp_path: Path, tiny_teacher_dir, tiny_corpus_dir
) -> None:
    base = tiny_overrides(tiny_teacher_dir, tiny_corpus_dir, tmp_path / "cache")
    cfg = to_pipeline_config(compose(base + ["train.teacher_mode=cached", "loss=jsd"]))
    train.run(cfg, tmp_path / "a")
    (folder,) = (tmp_path / "cache" / "teacher_logits").iterdir()
    manifest = json.loads((folder / "manifest.json").read_text())
    assert (manifest["block_size"], manifest["top_k"]) == (16, 64)
    shards = sorted(folder.glob("shard-*.safetensors"))
    assert shards
    rows = [
        json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    ]
    assert all(r["kd"] > 0 for r in rows if r["kind"] == "train")
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [2, 4]

    # Same teacher/data/k/temperature, another loss and ratio: the same cache, nothing added.
    again = to_pipeline_config(
        compose(base + ["train.teacher_mode=cached", "loss=tvd", "loss.kd_ratio=1.0"])
    )
    train.run(again, tmp_path / "b")
    assert sorted(folder.glob("shard-*.safetensors")) == shards

    foreign = to_pipeline_config(
        compose(
            base
            + [
                "train.teacher_mode=cached",
                "data.block_size=8",
                f"train.teacher_cache_dir={folder}",
            ]
        )
    )
    with pytest.raises(CacheMismatchError, match="block_size"):
        train.run(foreign, tmp_path / "c")


def test_cache_script_caches_every_training_block(
    tmp_path: Path, tiny_teacher_dir, tiny_corpus_dir, capsys
) -> None:
    from distill.train import teacher_cache

    overrides = [
        "train.teacher_top_k=8",
        "train.batch_size=64",  # the teacher pass's batch: few forwards
        f"train.teacher_cache_dir={tmp_path / 'tc'}",
    ]
    cfg = to_pipeline_config(
        compose(tiny_overrides(tiny_teacher_dir, tiny_corpus_dir, tmp_path / "cache") + overrides)
    )
    path = teacher_cache.run(cfg, tmp_path / "run")
    assert path == tmp_path / "tc"
    assert json.loads((path / "manifest.json").read_text())["top_k"] == 8
    found = re.search(r": (\d+) blocks \((\d+) new\), (\d+) bytes/token", capsys.readouterr().out)
    assert found is not None
    blocks, new, per_token = map(int, found.groups())
    assert blocks == new > 0
    assert 8 * 4 + 4 <= per_token <= 8 * 4 + 4 + 2  # + shard header and block index
    with pytest.raises(teacher_cache.TeacherCacheError, match="teacher_top_k=100000"):
        manifest_for(tiny_llama(50), None, _blocks(), top_k=100000, temperature=1.0)
