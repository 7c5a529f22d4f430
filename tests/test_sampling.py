"""Seeded, batched generation: the caller's RNG untouched, greedy equal to one prompt at a
time, answers ending at the EOS they write, padding with an id the embedding holds."""

from __future__ import annotations

import pytest
import torch

from distill.sampling import GenerationError, generate
from tests.conftest import make_tokenizer, tiny_llama


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(vocab_size=300)


def test_generation_is_seeded(tok) -> None:
    model = tiny_llama(len(tok), seed=1)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    state = torch.get_rng_state()
    a = generate(model, prompts, max_new_tokens=6, temperature=1.0, seed=7, batch_size=2)
    assert torch.equal(state, torch.get_rng_state())  # the caller's RNG is untouched
    b = generate(model, prompts, max_new_tokens=6, temperature=1.0, seed=7, batch_size=2)
    c = generate(model, prompts, max_new_tokens=6, temperature=1.0, seed=8, batch_size=2)
    assert a == b and a != c
    # Greedy: the same as one prompt at a time with no padding.
    greedy = generate(model, prompts, max_new_tokens=5, temperature=0.0, seed=0, batch_size=3)
    alone = [
        generate(model, [p], max_new_tokens=5, temperature=0.0, seed=0, batch_size=1)[0]
        for p in prompts
    ]
    assert greedy == alone


def test_generation_stops_at_eos_and_keeps_it(tok) -> None:
    """The model is made to write its EOS: each answer ends right after it, EOS included,
    while a batch-mate that never writes it runs to max_new_tokens."""
    model = tiny_llama(len(tok), seed=4, tie=False)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    free = generate(model, prompts, max_new_tokens=6, temperature=0.0, seed=0, batch_size=3)
    stop = free[0][2]  # a token the first answer writes third: from now on it is the EOS
    assert len(free[0]) == 6 and stop not in free[0][:2]
    model.config.eos_token_id = stop
    model.generation_config.eos_token_id = stop
    stopped = generate(model, prompts, max_new_tokens=6, temperature=0.0, seed=0, batch_size=3)
    assert stopped[0] == free[0][:3]  # ends with the EOS it wrote
    for before, after in zip(free, stopped, strict=True):
        want = before[: before.index(stop) + 1] if stop in before else before
        assert after == want
    assert any(stop not in f for f in free)  # one answer ran to its limit beside them


def test_generation_refuses_bad_settings(tok) -> None:
    model = tiny_llama(len(tok))
    with pytest.raises(GenerationError, match="no tokens"):
        generate(model, [[]], max_new_tokens=2, temperature=0.0, seed=0, batch_size=1)
    with pytest.raises(GenerationError, match="temperature"):
        generate(model, [[1]], max_new_tokens=2, temperature=-1.0, seed=0, batch_size=1)


def test_generation_pads_with_an_id_the_embedding_holds(tok) -> None:
    from tests.conftest import tiny_gpt2

    model = tiny_gpt2(len(tok))  # its config's EOS / pad id 50256 lies outside 300 tokens
    assert model.config.eos_token_id >= len(tok)
    out = generate(model, [[5, 6, 7], [8]], max_new_tokens=3, temperature=0.0, seed=0, batch_size=2)
    alone = generate(model, [[8]], max_new_tokens=3, temperature=0.0, seed=0, batch_size=1)
    assert len(out[0]) == 3 and out[1] == alone[0]
