"""Prompts drawn from documents: deterministic, chat turns and continuations, and never across
the split: every fidelity prompt comes from a validation document, every training prompt from
a training document."""

from __future__ import annotations

from pathlib import Path

import pytest

from distill.config import DataConfig, EvalConfig, PairConfig, PipelineConfig, StudentConfig
from distill.data import Document, load_documents, split_documents
from distill.evaluate.fidelity import fidelity_inputs
from distill.prompts import make_prompts
from distill.teacher_text import training_prompts
from tests.conftest import CORPUS, make_tokenizer

# A chat template of our own: enough to tell chat prompts from continuations.
TEMPLATE = (
    "{% for m in messages %}<|endoftext|>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(vocab_size=300)


@pytest.fixture(scope="module")
def chat_tok():
    t = make_tokenizer(vocab_size=300)
    t.chat_template = TEMPLATE
    return t


DOCS = [Document(f"doc{i}", f"Document {i}.\n" + CORPUS) for i in range(5)]


def test_prompts_are_deterministic_and_follow_the_chat_share(chat_tok, tok) -> None:
    a = make_prompts(DOCS, chat_tok, 10, chat_share=0.5, prompt_tokens=8, seed=3)
    b = make_prompts(list(reversed(DOCS)), chat_tok, 10, chat_share=0.5, prompt_tokens=8, seed=3)
    assert a == b  # the corpus order does not matter
    assert [p.kind for p in a].count("chat") == 5
    chat = [p for p in a if p.kind == "chat"]
    assert all(chat_tok.decode(p.tokens).rstrip().endswith("assistant:") for p in chat)
    assert all(len(p.tokens) == 8 for p in a if p.kind == "continuation")
    assert make_prompts(DOCS, chat_tok, 10, chat_share=0.5, prompt_tokens=8, seed=4) != a
    # Without a chat template every prompt is a continuation.
    plain = make_prompts(DOCS, tok, 10, chat_share=0.5, prompt_tokens=8, seed=3)
    assert {p.kind for p in plain} == {"continuation"}


def test_more_prompts_than_documents_take_other_windows(tok) -> None:
    docs = [Document("a", "\n".join(f"line {i:02d}. " + CORPUS[:60] for i in range(40)))]
    prompts = make_prompts(docs, tok, 3, chat_share=0.0, prompt_tokens=12, seed=0)
    assert len({p.source for p in prompts}) == 3
    assert len({p.tokens for p in prompts}) == 3


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("split")
    for i in range(12):
        (folder / f"doc{i:02d}.txt").write_text(f"Document {i}.\n" + CORPUS * (1 + i % 3))
    return folder


def test_no_prompt_crosses_the_train_val_split(corpus: Path) -> None:
    tok = make_tokenizer(300)
    tok.chat_template = TEMPLATE  # chat prompts and continuations both
    data = DataConfig(source="text_files", paths=[str(corpus / "*.txt")], val_fraction=0.3)
    cfg = PipelineConfig(
        pair=PairConfig(name="split", student=StudentConfig(num_layers=1)),
        data=data,
        eval=EvalConfig(teacher_text_prompts=20, generation_prompts=12, fidelity_prompt_tokens=8),
    )
    cfg.data.generated_prompts = 30
    train_docs, val_docs = split_documents(load_documents(data), 0.3, data.split_seed)
    train_ids, val_ids = {d.doc_id for d in train_docs}, {d.doc_id for d in val_docs}
    assert train_ids and val_ids and not train_ids & val_ids

    inputs = fidelity_inputs(cfg, tok)
    assert inputs is not None
    evaluation = inputs.teacher_text + inputs.generation
    assert len(inputs.teacher_text) == 20 and len(inputs.generation) == 12
    assert {p.kind for p in evaluation} == {"chat", "continuation"}
    assert {p.doc_id for p in evaluation} <= val_ids
    training = training_prompts(cfg.data, tok)
    assert len(training) == 30
    assert {p.doc_id for p in training} <= train_ids
    # Enough of each side is drawn on that a swap of the two would show.
    assert len({p.doc_id for p in training}) > 1 and len({p.doc_id for p in evaluation}) > 1
