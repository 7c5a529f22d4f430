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
    from distill.evaluate.draft import llama_cpp_speeds
    from distill.quantize.gguf import export_gguf
    from tests.conftest import make_tokenizer

    bpe = make_tokenizer(300)  # llama.cpp's BPE vocabulary needs merges
    teacher = export_gguf(tiny_llama(300, seed=3, tie=False), bpe, tmp_path / "t.gguf", "f16")
    draft = export_gguf(tiny_llama(300, layers=1, seed=4), bpe, tmp_path / "d.gguf", "q8_0")
    prompts = [tuple(range(5 + i, 12 + i)) for i in range(3)]
    result = llama_cpp_speeds(teacher.path, draft.path, prompts, 10, [1, 3], threads=1)
    assert result["teacher_s"] > 0 and (result["answers"], result["tokens"]) == (3, 30)
    assert [r["draft_length"] for r in result["by_draft_length"]] == [1, 3]
    for r in result["by_draft_length"]:
        assert r["identical"] is True and r["identical_answers"] == 3, r
        assert r["shared_prefix"] == 30 and r["assisted_s"] > 0, r


def _timed(speedups: list[float], identical: list[bool]) -> dict:
    rows = [
        {
            "draft_length": k,
            "assisted_s": 10.0 / s,
            "speedup": s,
            "identical": same,
            "identical_answers": 4 if same else 3,
            "shared_prefix": 192 if same else 170,
        }
        for k, s, same in zip([1, 2, 4], speedups, identical, strict=True)
    ]
    return {
        "gguf": "q4_0",
        "new_tokens": 48,
        "threads": 2,
        "teacher_s": 10.0,
        "answers": 4,
        "tokens": 192,
        "by_draft_length": rows,
        "error": None,
    }


def test_the_report_gives_the_timed_draft_lengths_and_the_best() -> None:
    from distill.evaluate.fidelity_table import draft_lines, draft_summary

    answers = {
        "draft": {
            "top1_on_teacher_answers": 0.5,
            "by_draft_length": {"4": {"acceptance": 0.5, "tokens_per_pass": 1.6}},
        }
    }
    report = {
        "variants": [{"name": "student", "fidelity": {"generation": answers}}],
        "draft_speed": _timed([0.8, 0.9, 0.7], [True, False, True]),
    }
    text = "\n".join(draft_lines(report))
    assert "| 1 | 10.0 | 12.5 | 0.80× | yes |" in text
    assert "| 2 | 10.0 | 11.1 | 0.90× | no: 3 of 4 answers; 170 of 192 tokens" in text
    assert "Best: k = 2, 0.90×" in text
    card = draft_summary(report)
    assert "Q4_0 file drafting 2 tokens ran the teacher's F16 file at 0.90×" in card
    assert "not always identical" in card
    # Not timed: the report says why, and the card claims no speed.
    report["draft_speed"] = {"gguf": "q4_0", "error": "the run has no student q4_0 GGUF file"}
    assert "not timed as a draft model in llama.cpp: the run has no student q4_0" in "\n".join(
        draft_lines(report)
    )
    assert "Timed" not in draft_summary(report)
