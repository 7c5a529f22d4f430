"""The variant as the teacher's draft model (distill/evaluate/draft.py)."""

from __future__ import annotations

import math

import pytest
import torch

from distill.evaluate.draft import assisted_speed, draft_fields, speculation, torch_matches
from distill.sampling import generate
from tests.conftest import tiny_llama

VOCAB = 64
PROMPTS = [tuple(int(t) for t in torch.arange(5) * (3 + i) % VOCAB + 1) for i in range(4)]


def test_speculation_counts_passes_as_greedy_speculative_decoding_does() -> None:
    # k=2 on [yes, yes, no, yes]: pass 1 drafts 2 (both kept) + the teacher's own -> 3 tokens;
    # pass 2 drafts the last one (kept) -> 1 token (no room for more). 4 tokens in 2 passes.
    assert speculation([[True, True, False, True]], 2) == {
        "acceptance": 1.0,
        "tokens_per_pass": 2.0,
    }
    # A draft that never guesses right: every pass yields the teacher's one token.
    assert speculation([[False] * 5], 4) == {"acceptance": 0.0, "tokens_per_pass": 1.0}
    # k=1 on [no, yes, yes]: 1 (rejected) + then 2 (accepted + own) -> 3 tokens in 2 passes.
    assert speculation([[False, True, True]], 1) == {"acceptance": 0.5, "tokens_per_pass": 1.5}
    assert math.isnan(speculation([[]], 3)["acceptance"])


def test_a_model_drafting_for_itself_guesses_every_token() -> None:
    teacher = tiny_llama(VOCAB, seed=1, tie=False)
    answers = generate(teacher, PROMPTS, max_new_tokens=6, temperature=0, seed=0, batch_size=1)
    own = torch_matches(teacher, PROMPTS, answers, batch_size=3)
    assert [len(m) for m in own] == [len(a) for a in answers] and all(all(m) for m in own)
    fields = draft_fields(own)
    assert fields["top1_on_teacher_answers"] == 1.0
    assert fields["by_draft_length"]["4"]["acceptance"] == 1.0
    other = torch_matches(tiny_llama(VOCAB, seed=2, tie=False), PROMPTS, answers, batch_size=3)
    assert not all(all(m) for m in other)  # another model misses some


def test_assisted_decoding_with_a_draft_keeps_the_teachers_output() -> None:
    teacher = tiny_llama(VOCAB, seed=1, tie=False)
    draft = tiny_llama(VOCAB, layers=1, seed=2, tie=False)
    result = assisted_speed(teacher, draft, PROMPTS[:2], new_tokens=8, draft_length=3)
    assert result["identical"] is True and result["teacher_s"] > 0 and result["assisted_s"] > 0


@pytest.mark.parametrize("draft_length", [1, 3])
def test_tokens_per_pass_is_bounded_by_the_draft_length(draft_length: int) -> None:
    rows = [[True] * 9, [True, False] * 4]
    per_pass = speculation(rows, draft_length)["tokens_per_pass"]
    assert 1.0 <= per_pass <= draft_length + 1


def test_speculative_decoding_in_llama_cpp_keeps_the_teachers_output(tmp_path) -> None:
    from distill.evaluate.draft import llama_cpp_speed
    from distill.quantize.gguf import export_gguf
    from tests.conftest import make_tokenizer

    bpe = make_tokenizer(300)  # llama.cpp's BPE vocabulary needs merges
    teacher = export_gguf(tiny_llama(300, seed=3, tie=False), bpe, tmp_path / "t.gguf", "f16")
    draft = export_gguf(tiny_llama(300, layers=1, seed=4), bpe, tmp_path / "d.gguf", "q8_0")
    prompts = [tuple(range(5 + i, 12 + i)) for i in range(3)]
    result = llama_cpp_speed(teacher.path, draft.path, prompts, 10, 3, threads=1)
    assert result["identical"] is True and result["assisted_s"] > 0
