"""The teacher's own questions: drafted after its chat template's user prefix, filtered, and
kept apart: the evaluation's general questions are never among those training asks."""

from __future__ import annotations

from pathlib import Path

import pytest

import distill.teacher_text as teacher_text
from distill.config import DataConfig, EvalConfig, PairConfig, PipelineConfig, StudentConfig
from distill.prompts import PromptError, looping, usable_questions, user_prefix
from tests.conftest import tiny_tokenizer, word_llama

EOS = 129
# The user's text between w1 and w2; the answer after w3.
TEMPLATE = (
    "{% for m in messages %}w1 {{ m['content'] }} w2 {% endfor %}"
    "{% if add_generation_prompt %}w3{% endif %}"
)


@pytest.fixture
def chat_tok():
    tok = tiny_tokenizer()
    tok.chat_template = TEMPLATE
    return tok


def test_the_user_prefix_is_the_template_before_the_users_text(chat_tok) -> None:
    assert user_prefix(chat_tok) == (1,)  # "w1 "
    with pytest.raises(PromptError, match="no chat template"):
        user_prefix(tiny_tokenizer())


def test_only_whole_new_questions_that_do_not_loop_are_kept() -> None:
    drafts = [
        ("How do tides work?", True),
        ("What is the best way to learn", False),  # cut off at the token limit
        ("Hi there", True),  # too short
        ("the dog and the cat the dog and the cat the dog and the cat", True),  # a loop
        ("how do  TIDES work?", True),  # the first again, case and spacing aside
        ("Write a haiku about rain.", True),  # asked by the evaluation
        ("  Name three rivers in Europe. ", True),
    ]
    kept = usable_questions(drafts, exclude=["write a haiku about RAIN."])
    assert kept == ["How do tides work?", "Name three rivers in Europe."]
    assert looping("a b c a b c a b c a b c") and not looping("How do tides work on Mars?")


def fake_generate(model, prompts, *, max_new_tokens, temperature, seed, batch_size, desc=None):
    """Drafts and answers from a pool of three questions (w10.. w12 first), whatever the seed:
    the evaluation's and training's drafts collide. Each ends with EOS."""
    return [(10 + (seed + i) % 3, 20, 21, 22, EOS) for i in range(len(prompts))]


def pipeline_config(tmp_path: Path, own_share: float) -> PipelineConfig:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"doc{i}.txt").write_text(" ".join(f"w{(i * 7 + j) % 128}" for j in range(80)))
    return PipelineConfig(
        pair=PairConfig(name="own", student=StudentConfig(num_layers=1)),
        data=DataConfig(
            source="text_files",
            paths=[str(corpus / "*.txt")],
            generated_prompts=6,
            generated_own_share=own_share,
            generated_batch_size=2,
        ),
        eval=EvalConfig(general_prompts=2, generation_batch_size=2),
        cache_dir=str(tmp_path / "cache"),
    )


def test_training_never_asks_the_evaluations_general_questions(
    tmp_path: Path, chat_tok, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(teacher_text, "generate", fake_generate)
    cfg = pipeline_config(tmp_path, own_share=0.5)
    teacher = word_llama(0)
    general = teacher_text.general_questions(cfg, teacher, chat_tok, "weights")
    assert len(general) == 2  # two of the pool's three questions
    samples = teacher_text.training_samples(
        cfg.data, teacher, chat_tok, tmp_path / "cache", teacher_weights="weights", exclude=general
    )
    own = [s for s in samples if s.kind == teacher_text.OWN]
    asked = {chat_tok.decode(s.prompt[1:-2]).strip() for s in own}  # between w1 and " w2 w3"
    # Three wanted, but only the pool's third question is not the evaluation's.
    assert len(own) == 1 and not asked & set(general), (asked, general)
    assert len(samples) - len(own) == 3  # the corpus prompts: the other half


def test_a_tokenizer_without_a_template_trains_on_corpus_prompts_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(teacher_text, "generate", fake_generate)
    cfg = pipeline_config(tmp_path, own_share=0.5)
    with caplog.at_level("WARNING"):
        samples = teacher_text.training_samples(
            cfg.data, word_llama(0), tiny_tokenizer(), tmp_path / "cache", teacher_weights="w"
        )
    assert len(samples) == 6 and not [s for s in samples if s.kind == teacher_text.OWN]
    assert "generated_own_share=0.5 is ignored" in caplog.text
