"""pair.student.num_layers alone: the greedy search's layers, searched once per teacher and data."""

from __future__ import annotations

import pytest
import torch
from transformers import PreTrainedModel

from distill.config import StudentConfig
from distill.models import layer_cache, layer_search
from distill.models.build import build_student
from distill.models.layer_search import greedy_layer_drop
from distill.models.load import ModelError, freeze
from distill.models.student import decoder_layers
from tests.conftest import tiny_llama

VOCAB = 96


@pytest.fixture
def teacher() -> PreTrainedModel:
    # Seed 3 makes greedy keep other layers than "first half + last half" ([0, 1, 4, 5] of
    # 6): the test below then tells the two rules apart.
    model = freeze(tiny_llama(VOCAB, layers=6, seed=3))
    for p in model.parameters():  # a wide init: every block matters, the scores differ
        p.data.mul_(6.0)
    return model


@pytest.fixture
def train_blocks() -> torch.Tensor:
    return torch.randint(0, VOCAB, (6, 12), generator=torch.Generator().manual_seed(0))


def fresh_search(teacher: PreTrainedModel, blocks: torch.Tensor, k: int) -> list[list[int]]:
    calib = blocks[: layer_cache.SEARCH_CALIB_BLOCKS]
    trajectory = greedy_layer_drop(
        teacher, calib, k, batch_size=layer_cache.SEARCH_BATCH_SIZE, progress=False
    )
    return [s["layers"] for s in trajectory]


def test_continuing_a_trajectory_equals_a_fresh_search(teacher, train_blocks) -> None:
    calib = train_blocks[:4]
    whole = greedy_layer_drop(teacher, calib, 1, batch_size=1, progress=False)
    head = greedy_layer_drop(teacher, calib, 4, batch_size=1, progress=False)
    tail = greedy_layer_drop(teacher, calib, 1, batch_size=1, progress=False, start=head[-1])
    assert tail[0] == head[-1]
    assert [s["layers"] for s in head + tail[1:]] == [s["layers"] for s in whole]
    for a, b in zip(head + tail[1:], whole, strict=True):
        assert a["perplexity"] == pytest.approx(b["perplexity"], rel=1e-5)


def test_num_layers_alone_keeps_the_greedy_layers(teacher, train_blocks, tmp_path) -> None:
    expected = fresh_search(teacher, train_blocks, 4)[-1]
    assert expected != [0, 1, 4, 5]  # the old first-half + last-half rule would differ
    student, _ = build_student(
        StudentConfig(num_layers=4), teacher, 0, train_blocks=train_blocks, cache_dir=tmp_path
    )
    _, kept = decoder_layers(student)
    _, teacher_layers = decoder_layers(teacher)
    for s_block, t_index in zip(kept, expected, strict=True):
        for key, value in s_block.state_dict().items():
            assert torch.equal(value, teacher_layers[t_index].state_dict()[key]), key
    assert len(list((tmp_path / "layer_search").glob("*.json"))) == 1


def test_a_depth_sweep_searches_once(teacher, train_blocks, tmp_path, monkeypatch) -> None:
    calls: list[tuple[int, int]] = []
    real = layer_search.greedy_layer_drop

    def counted(model, blocks, target, **kwargs):
        start = kwargs.get("start")
        calls.append((start["num_layers"] if start else 6, target))
        return real(model, blocks, target, **kwargs)

    monkeypatch.setattr(layer_cache, "greedy_layer_drop", counted)
    trajectory = fresh_search(teacher, train_blocks, 2)
    got = {
        k: layer_cache.greedy_layers(teacher, train_blocks, k, tmp_path) for k in (4, 5, 3, 2, 4)
    }
    assert got == {k: trajectory[6 - k] for k in (5, 4, 3, 2)}
    # 6 -> 4 once; 5 and the second 4 read the file; 3 and then 2 continue it from its end.
    assert calls == [(6, 4), (4, 3), (3, 2)]
    # Another teacher (or other data) is another file: no stale layers.
    other = freeze(tiny_llama(VOCAB, layers=6, seed=4))
    layer_cache.greedy_layers(other, train_blocks, 4, tmp_path)
    layer_cache.greedy_layers(teacher, train_blocks[1:], 4, tmp_path)
    assert len(calls) == 5
    assert len(list((tmp_path / "layer_search").glob("*.json"))) == 3


def test_depth_errors_name_both_keys(teacher, train_blocks, tmp_path) -> None:
    with pytest.raises(ModelError, match=r"pair\.student\.num_layers=7.*pair\.student\.layers"):
        build_student(
            StudentConfig(num_layers=7), teacher, 0, train_blocks=train_blocks, cache_dir=tmp_path
        )
    with pytest.raises(ModelError, match=r"pair\.student\.layers has \[6\].*pair\.student\.num"):
        build_student(StudentConfig(layers=[0, 6]), teacher, 0)
