"""Greedy layer drop on microscopic llama and GPT-2 models, checked against real students."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, PreTrainedModel

from distill.models.layer_search import (
    LayerSearchError,
    format_ranges,
    greedy_layer_drop,
    perplexity,
    student_perplexities,
)
from distill.models.load import freeze
from distill.models.student import build_student_from_teacher, decoder_layers

VOCAB = 128
NUM_LAYERS = 4


def tiny_llama() -> PreTrainedModel:
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        # A wide init makes every block matter, so the layers' scores differ clearly.
        initializer_range=0.2,
    )
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def tiny_gpt2() -> PreTrainedModel:
    config = GPT2Config(
        vocab_size=VOCAB,
        n_layer=NUM_LAYERS,
        n_embd=32,
        n_head=4,
        n_positions=64,
        initializer_range=0.2,
    )
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


@pytest.fixture(params=[tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def model(request: pytest.FixtureRequest) -> PreTrainedModel:
    torch.manual_seed(0)
    return freeze(request.param())


@pytest.fixture
def blocks() -> torch.Tensor:
    # Five blocks with batch_size=2 leave a short last batch: per-token weighting matters.
    return torch.randint(0, VOCAB, (5, 16), generator=torch.Generator().manual_seed(1))


def test_search_matches_real_students(model: PreTrainedModel, blocks: torch.Tensor) -> None:
    before = perplexity(model, blocks, batch_size=2)
    _, layer_list = decoder_layers(model)

    trajectory = greedy_layer_drop(model, blocks, 2, batch_size=2, progress=False)

    assert [step["num_layers"] for step in trajectory] == [4, 3, 2]
    assert trajectory[0]["layers"] == [0, 1, 2, 3] and trajectory[0]["dropped"] is None
    final = trajectory[-1]["layers"]
    assert len(final) == 2 and final == sorted(set(final))
    assert all(0 <= i < NUM_LAYERS for i in final)
    for prev, step in zip(trajectory, trajectory[1:], strict=False):
        assert step["layers"] == [i for i in prev["layers"] if i != step["dropped"]]
    # Every score, including the cached-prefix ones, equals a freshly built student's.
    for step in trajectory[1:]:
        student = build_student_from_teacher(model, step["layers"])
        fresh = perplexity(student, blocks, batch_size=2)
        assert step["perplexity"] == pytest.approx(fresh, rel=1e-4)
    # Step 1 picked the best of all four single drops, scored the slow, obvious way.
    singles = {
        i: perplexity(
            build_student_from_teacher(model, [j for j in range(4) if j != i]), blocks, batch_size=5
        )
        for i in range(4)
    }
    assert trajectory[1]["dropped"] == min(singles, key=singles.__getitem__)
    # The model is left as found.
    assert decoder_layers(model)[1] is layer_list and not model.training
    assert perplexity(model, blocks, batch_size=2) == before


def test_perplexity_is_token_weighted(blocks: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = freeze(tiny_llama())
    whole = perplexity(model, blocks, batch_size=5)
    assert perplexity(model, blocks, batch_size=2) == pytest.approx(whole, rel=1e-5)
    assert student_perplexities(model, {"all": list(range(4))}, blocks, batch_size=3)[
        "all"
    ] == pytest.approx(whole, rel=1e-5)


def test_bad_arguments_raise(blocks: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = freeze(tiny_llama())
    with pytest.raises(LayerSearchError, match="target_layers=5"):
        greedy_layer_drop(model, blocks, 5, batch_size=2, progress=False)
    with pytest.raises(LayerSearchError, match="target_layers=0"):
        greedy_layer_drop(model, blocks, 0, batch_size=2, progress=False)
    with pytest.raises(LayerSearchError, match="batch_size=0"):
        greedy_layer_drop(model, blocks, 2, batch_size=0, progress=False)
    with pytest.raises(LayerSearchError, match="shape"):
        greedy_layer_drop(model, blocks[0], 2, batch_size=2, progress=False)


def test_target_equal_to_depth_drops_nothing(blocks: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = freeze(tiny_llama())
    trajectory = greedy_layer_drop(model, blocks, NUM_LAYERS, batch_size=2, progress=False)
    assert len(trajectory) == 1 and trajectory[0]["layers"] == [0, 1, 2, 3]


def test_format_ranges() -> None:
    assert format_ranges([8, 0, 1, 2, 5, 7]) == "0-2,5,7-8"
    assert format_ranges([3]) == "3"
    assert format_ranges([]) == ""


def test_pruning_does_not_change_the_choice(blocks: torch.Tensor) -> None:
    # One block per batch abandons most candidates early; one batch of all never does.
    torch.manual_seed(0)
    model = freeze(tiny_llama())
    pruned = greedy_layer_drop(model, blocks, 1, batch_size=1, progress=False)
    whole = greedy_layer_drop(model, blocks, 1, batch_size=5, progress=False)
    assert [s["layers"] for s in pruned] == [s["layers"] for s in whole]
    for a, b in zip(pruned, whole, strict=True):
        assert a["perplexity"] == pytest.approx(b["perplexity"], rel=1e-4)
