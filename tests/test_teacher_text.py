"""The teacher's text, generated once and cached: refused for another teacher or prompt set,
resumed after an interruption, packed and mixed into the training blocks."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from distill.caches import CacheMismatchError
from distill.data import Document, mix_blocks, pack_token_lists, tokenizer_fingerprint
from distill.models import weights_hash
from distill.prompts import make_prompts
from distill.sampling import generate
from distill.teacher_text import teacher_samples
from tests.conftest import CORPUS, make_tokenizer, tiny_llama


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(vocab_size=300)


DOCS = [Document(f"doc{i}", f"Document {i}.\n" + CORPUS) for i in range(5)]


def _samples(model, tok, prompts, cache: Path, batch_size: int = 4, **kw):
    return teacher_samples(
        model,
        tokenizer_fingerprint(tok),
        prompts,
        teacher_weights=weights_hash(model),
        max_new_tokens=4,
        temperature=1.0,
        seed=0,
        batch_size=batch_size,
        cache_dir=cache,
        **kw,
    ).samples


def test_teacher_text_is_cached_and_refused_for_another_teacher_or_prompts(
    tok, tmp_path: Path, monkeypatch
) -> None:
    teacher = tiny_llama(len(tok), seed=2)
    prompts = make_prompts(DOCS, tok, 4, chat_share=0.0, prompt_tokens=6, seed=0)
    first = _samples(teacher, tok, prompts, tmp_path)
    assert [s.prompt for s in first] == [p.tokens for p in prompts]
    (folder,) = (tmp_path / "teacher_text").iterdir()
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["num_prompts"] == 4 and manifest["max_new_tokens"] == 4

    import distill.teacher_text as generation

    def no_generation(*a, **k):
        raise AssertionError("regenerated instead of reading the cache")

    monkeypatch.setattr(generation, "generate", no_generation)
    assert _samples(teacher, tok, prompts, tmp_path) == first
    monkeypatch.undo()

    other = copy.deepcopy(teacher)
    with torch.no_grad():
        other.model.embed_tokens.weight.add_(0.01)
    with pytest.raises(CacheMismatchError, match="teacher_weights") as err:
        _samples(other, tok, prompts, tmp_path, folder=folder)
    assert err.value.mismatched == ["teacher_weights"]
    fewer = prompts[:3]
    with pytest.raises(CacheMismatchError) as err:
        _samples(teacher, tok, fewer, tmp_path, folder=folder)
    assert set(err.value.mismatched) == {"prompts", "num_prompts"}
    # Without an explicit folder another teacher simply gets its own cache.
    assert len(_samples(other, tok, prompts, tmp_path)) == 4
    assert len(list((tmp_path / "teacher_text").iterdir())) == 2


def test_an_interrupted_generation_resumes_to_the_same_samples(
    tok, tmp_path: Path, monkeypatch
) -> None:
    import distill.teacher_text as generation

    teacher = tiny_llama(len(tok), seed=3)
    prompts = make_prompts(DOCS, tok, 10, chat_share=0.0, prompt_tokens=6, seed=1)
    whole = _samples(teacher, tok, prompts, tmp_path / "a", batch_size=2)
    one_call = generate(
        teacher,
        [p.tokens for p in prompts],
        max_new_tokens=4,
        temperature=1.0,
        seed=0,
        batch_size=2,
    )
    assert [s.completion for s in whole] == one_call  # parts give what one call gives
    real, calls = generation.generate, []

    def dies_on_the_second_part(*args, **kwargs):
        calls.append(kwargs["seed"])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(generation, "generate", dies_on_the_second_part)
    with pytest.raises(KeyboardInterrupt):
        _samples(teacher, tok, prompts, tmp_path / "b", batch_size=2)
    (folder,) = (tmp_path / "b" / "teacher_text").iterdir()
    assert not (folder / "COMPLETE").exists()
    assert len(list((folder / "parts").glob("*.json"))) == 1
    calls.clear()
    monkeypatch.setattr(generation, "generate", real)
    assert _samples(teacher, tok, prompts, tmp_path / "b", batch_size=2) == whole
    assert (folder / "COMPLETE").exists() and not list((folder / "parts").glob("*.json"))


def test_samples_pack_with_one_eos_between_them() -> None:
    blocks = pack_token_lists([(1, 2, 9), (3, 4), (5,)], eos=9, block_size=3)
    # (1, 2, 9) already ends with EOS; the others get one.
    assert blocks.tolist() == [[1, 2, 9], [3, 4, 9]]  # the tail [5, 9] is dropped


def test_mix_blocks_holds_the_share_and_drops_nothing() -> None:
    corpus = torch.arange(40).view(20, 2)
    generated = torch.arange(100, 110).view(5, 2)
    half = mix_blocks(corpus, generated, 0.5)
    assert half.shape[0] == 40
    from_gen = (half[:, 0] >= 100).sum().item()
    assert from_gen == 20  # the 5 samples repeated 4 times
    assert {tuple(r) for r in corpus.tolist()} <= {tuple(r) for r in half.tolist()}
    short = mix_blocks(corpus[:1], generated, 0.5)  # the corpus is short: it repeats
    assert short.shape[0] == 10 and (short[:, 0] >= 100).sum().item() == 5
    assert (short[:, 0] == 0).sum().item() == 5
    mostly = mix_blocks(corpus[:2], generated, 0.8)  # 2 corpus blocks: 8 generated ones
    assert mostly.shape[0] == 10 and (mostly[:, 0] >= 100).sum().item() == 8
    assert torch.equal(mix_blocks(corpus, generated, 1.0), generated)
