"""Prompts drawn from documents: chat turns about a passage, and continuation windows.

Training text the teacher writes (:func:`distill.teacher_text.training_samples`) and the
evaluation's fidelity sets (:mod:`distill.evaluate.fidelity`) both prompt from documents: the
training prompts from the *training* documents only, the evaluation's from the *validation*
documents only (the train/val split of :func:`distill.data.split_documents`), each under its
own seed (:data:`TRAIN_PROMPT_SEED`, :data:`TEACHER_TEXT_SEED`, :data:`GENERATION_SEED`), so the
windows stay apart too when a user points both at one corpus. Every prompt records where it
came from (``<doc id>@<char offset>``).

Chat prompts wrap a passage of a document in one of a few instructions and go through the
tokenizer's chat template, so an instruct teacher answers as it was tuned to; a tokenizer
without a chat template gets continuation prompts only.

An instruct teacher can also write the user's side: given only its chat template's user
prefix (:func:`user_prefix`) it drafts a question of the kind it was tuned to answer, on any
topic, not only the corpus's. :func:`usable_questions` keeps the drafts worth asking
(:func:`distill.teacher_text.teacher_questions` samples them).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from distill.errors import DistillError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from distill.data import Document

KINDS = ("continuation", "chat")
# Seed offsets from data.split_seed: training prompts and each evaluation set are drawn in
# their own orders.
TRAIN_PROMPT_SEED = 1_000
TEACHER_TEXT_SEED = 1_000_003
GENERATION_SEED = 2_000_003
# The teacher's own questions: those it trains on, and the evaluation's ``general`` set.
OWN_TRAIN_SEED = 3_000_017
GENERAL_SEED = 4_000_037

# Instructions a user might give about a passage; {passage} is a window of a document. Written
# for any prose corpus, so prompts can be drawn from whatever the user trains on.
CHAT_INSTRUCTIONS = (
    "Explain in simple words what this text says:\n\n{passage}",
    "What is the main point of the following text?\n\n{passage}",
    "Summarize this in two or three sentences:\n\n{passage}",
    "Give a short example that illustrates the following:\n\n{passage}",
    "A student read this and is confused. Help them understand it:\n\n{passage}",
    "Write one question a reader might ask about this text, then answer it:\n\n{passage}",
)
# Characters of a document put into a chat prompt.
PASSAGE_CHARS = 360


class PromptError(DistillError):
    """Prompts cannot be drawn as asked."""


@dataclass(frozen=True)
class Prompt:
    """One prompt: its ``kind`` (continuation or chat), where it came from
    (``<doc id>@<offset>``), its token ids."""

    kind: str
    source: str
    tokens: tuple[int, ...]

    @property
    def doc_id(self) -> str:
        return self.source.rsplit("@", 1)[0]


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_tokens(tokenizer: PreTrainedTokenizerBase, message: str) -> tuple[int, ...]:
    """``message`` as one user turn through the chat template, ready for the answer."""
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": message}], add_generation_prompt=True, tokenize=True
    )
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # some versions return a BatchEncoding
        ids = ids["input_ids"]
    return tuple(int(i) for i in ids)


def _order(docs: Sequence[Document], seed: int) -> list[int]:
    # A hash of (seed, document id): the same prompts whatever order the corpus was read in.
    def key(i: int) -> str:
        return hashlib.sha256(f"{seed}:{docs[i].doc_id}".encode()).hexdigest()

    return sorted(range(len(docs)), key=key)


def _window(text: str, index: int, chars: int) -> tuple[int, str]:
    """The ``index``-th window of ``text``, starting at a line start where there is one."""
    if len(text) <= chars:
        return 0, text
    starts = [0] + [i + 1 for i, c in enumerate(text[:-chars]) if c == "\n"]
    start = starts[(index * 7919) % len(starts)]
    return start, text[start : start + chars]


def make_prompts(
    docs: Sequence[Document],
    tokenizer: PreTrainedTokenizerBase,
    num_prompts: int,
    *,
    chat_share: float,
    prompt_tokens: int,
    seed: int,
) -> list[Prompt]:
    """``num_prompts`` prompts from ``docs``: a ``chat_share`` of them chat turns (when the
    tokenizer has a chat template), the rest the first ``prompt_tokens`` tokens of a window.

    Documents are visited in a seeded hash order, round after round (another window of each
    document every round), so a small corpus still gives many distinct prompts.

    Raises:
        PromptError: no document has text, or a setting is out of range.
    """
    if num_prompts < 1 or prompt_tokens < 1 or not 0.0 <= chat_share <= 1.0:
        raise PromptError(
            f"prompts: num_prompts={num_prompts} and prompt_tokens={prompt_tokens} must be "
            f">= 1 and chat_share={chat_share} in [0, 1]"
        )
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise PromptError("no document with text to draw prompts from")
    chat = has_chat_template(tokenizer)
    num_chat = round(num_prompts * chat_share) if chat else 0
    order = _order(docs, seed)
    prompts: list[Prompt] = []
    for i in range(num_prompts):
        doc = docs[order[i % len(docs)]]
        round_ = i // len(docs)
        if i < num_chat:
            start, passage = _window(doc.text, round_, PASSAGE_CHARS)
            template = CHAT_INSTRUCTIONS[(i + seed) % len(CHAT_INSTRUCTIONS)]
            tokens = chat_tokens(tokenizer, template.format(passage=passage.strip()))
            prompts.append(Prompt("chat", f"{doc.doc_id}@{start}", tokens))
        else:
            start, text = _window(doc.text, round_, prompt_tokens * 8)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"][:prompt_tokens]
            if ids:
                prompts.append(Prompt("continuation", f"{doc.doc_id}@{start}", tuple(ids)))
    return prompts


def prompts_hash(prompts: Sequence[Prompt]) -> str:
    h = hashlib.sha256()
    for p in prompts:
        h.update(json.dumps([p.kind, p.source, list(p.tokens)]).encode())
    return h.hexdigest()[:16]


# A stand-in message, to find where the user's text starts in the rendered template.
_MARK = "\u2063distill-user-turn\u2063"


def user_prefix(tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    """The chat template's tokens before a user's text (system turn included, when the
    template adds one): what the teacher continues to write a question of its own.

    Raises:
        PromptError: the tokenizer has no chat template, or its template does not put the
            user's text into the rendered turn verbatim.
    """
    if not has_chat_template(tokenizer):
        raise PromptError("the teacher's tokenizer has no chat template: it has no user turn")
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": _MARK}], add_generation_prompt=False, tokenize=False
    )
    if not isinstance(text, str) or _MARK not in text:
        raise PromptError("the chat template does not render the user's text verbatim")
    prefix = text[: text.index(_MARK)]
    return tuple(int(i) for i in tokenizer(prefix, add_special_tokens=False)["input_ids"])


def _words(text: str) -> list[str]:
    return text.lower().split()


def looping(text: str, n: int = 3, share: float = 0.2) -> bool:
    """Whether more than ``share`` of ``text``'s word ``n``-grams repeat an earlier one."""
    words = _words(text)
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return bool(grams) and (len(grams) - len(set(grams))) / len(grams) > share


def usable_questions(
    drafts: Sequence[tuple[str, bool]], *, min_words: int = 3, exclude: Sequence[str] = ()
) -> list[str]:
    """The drafts worth asking, in order: ``(text, ended)`` pairs, ``ended`` meaning the
    teacher closed its turn (a draft cut off at the token limit is dropped). Also dropped:
    fewer than ``min_words`` words, looping text (:func:`looping`), and a draft equal (case
    and spacing aside) to an earlier one or to one in ``exclude``."""
    seen = {" ".join(_words(q)) for q in exclude}
    out = []
    for text, ended in drafts:
        question = text.strip()
        key = " ".join(_words(question))
        if not ended or len(key.split()) < min_words or looping(question) or key in seen:
            continue
        seen.add(key)
        out.append(question)
    return out
