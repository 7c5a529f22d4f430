"""The ``tokenizer.*`` keys of a GGUF file: the student's tokenizer, embedded whole.

Two kinds. SentencePiece-style BPE (Gemma's: ``▁`` for spaces, ``<0xNN>`` byte fallback) is
written as GGUF's "llama" tokenizer: tokens, scores that reproduce the merge order, token
types (byte, unknown, control), and whether a space is prepended. Byte-level BPE (GPT-2
style, as SmolLM2, Llama 3 and Qwen use) is written as "gpt2": tokens in their
byte-alphabet spelling, merges, token types (control / user-defined added tokens), special
token ids, ``add_bos_token`` and the chat template. llama.cpp splits text before BPE with a
regex it picks by the ``tokenizer.ggml.pre`` name, so that name is read off the
``tokenizer.json`` pre-tokenizer: GPT-2's plain ``ByteLevel`` ("gpt-2"), SmolLM's
``Digits`` + ``ByteLevel`` ("smollm"), and the ``Split`` regexes of Llama 3 ("llama-bpe")
and Qwen2/2.5/3 ("qwen2"), matched as the exact strings those tokenizers ship (llama.cpp's
converter recognises them by hashing the ids of a test text instead, which needs the real
vocabulary).
"""

from __future__ import annotations

import json
import logging
import re
from typing import TYPE_CHECKING, Any

from distill.quantize.gguf_arch import GGUFExportError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

# The Split regexes as tokenizer.json holds them (llama.cpp's src/llama-vocab.cpp quotes both
# as the originals it adapted). They differ in digits only: Llama 3 groups up to three.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}", 1)


def _byte_level(p: dict, *, regex: bool) -> bool:
    return p.get("type") == "ByteLevel" and bool(p.get("use_regex", True)) is regex


def _split_regex(parts: list[dict]) -> str | None:
    """The regex of ``[Split(regex, Isolated), ByteLevel(use_regex=False)]``, else None."""
    if len(parts) != 2 or not _byte_level(parts[1], regex=False):
        return None
    split = parts[0]
    if split.get("type") != "Split" or split.get("behavior") != "Isolated" or split.get("invert"):
        return None
    return (split.get("pattern") or {}).get("Regex")


def pre_tokenizer_name(pre: dict | None, ignore_merges: bool = False) -> str:
    """llama.cpp's name for a ``tokenizer.json`` pre-tokenizer (``tokenizer.ggml.pre``).

    ``ignore_merges`` is the BPE model's flag (a word found whole in the vocabulary is one
    token, merges or not): llama.cpp ties it to the name, "llama-bpe" sets it and
    "smaug-bpe" (the same regex) does not. Anything unrecognised is written as "default",
    with a warning, as is a Qwen regex with ``ignore_merges`` (no llama.cpp name has both).
    """
    pre = pre or {}
    parts = (pre.get("pretokenizers") or []) if pre.get("type") == "Sequence" else []
    regex = _split_regex(parts)
    if _byte_level(pre, regex=True) and not ignore_merges:
        return "gpt-2"
    if (
        len(parts) == 2
        and parts[0].get("type") == "Digits"
        and parts[0].get("individual_digits")
        and _byte_level(parts[1], regex=True)
        and not ignore_merges
    ):
        return "smollm"
    if regex == LLAMA3_SPLIT:
        return "llama-bpe" if ignore_merges else "smaug-bpe"
    if regex == QWEN2_SPLIT and not ignore_merges:
        return "qwen2"
    log.warning(
        "GGUF export: no llama.cpp pre-tokenizer for %s (ignore_merges=%s), writing 'default': "
        "llama.cpp may split text differently",
        pre,
        ignore_merges,
    )
    return "default"


# llama.cpp's token types (llama_token_type in llama.h).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_BYTE_TOKEN = re.compile(r"^<0x[0-9A-F]{2}>$")


def _is_sentencepiece(spec: dict) -> bool:
    """A SentencePiece-style BPE (Gemma, Llama 2): ``▁`` for spaces, unknown characters
    spelled as ``<0xNN>`` byte tokens, no byte-level alphabet."""
    model = spec.get("model") or {}
    decoder = spec.get("decoder") or {}
    steps = decoder.get("decoders") or [decoder]
    return bool(model.get("byte_fallback")) and any(d.get("type") == "ByteFallback" for d in steps)


def _merges_across_words(spec: dict) -> bool:
    """Whether the tokenizer's BPE runs over the whole text, as llama.cpp's SentencePiece
    merging does: no pre-tokenizer, a ``Metaspace`` that does not split, or a split on
    ``" "`` that finds none (the normalizer has already turned every space into ``▁``)."""
    pre = spec.get("pre_tokenizer")
    if not pre:
        return True
    if pre.get("type") == "Metaspace":
        return pre.get("split") is False
    normalizer = spec.get("normalizer") or {}
    steps = normalizer.get("normalizers") or [normalizer]
    spaces_gone = any(
        n.get("type") == "Replace"
        and (n.get("pattern") or {}).get("String") == " "
        and n.get("content") == "\u2581"
        for n in steps
    )
    return (
        pre.get("type") == "Split"
        and (pre.get("pattern") or {}).get("String") == " "
        and spaces_gone
    )


def _adds_space_prefix(spec: dict) -> bool:
    """Whether encoding puts ``▁`` before the text (a ``Prepend`` normalizer or a
    ``Metaspace`` that prepends): llama.cpp's ``add_space_prefix``."""
    normalizer = spec.get("normalizer") or {}
    steps = normalizer.get("normalizers") or [normalizer]
    if any(n.get("type") == "Prepend" and n.get("prepend") == "\u2581" for n in steps):
        return True
    pre = spec.get("pre_tokenizer") or {}
    return pre.get("type") == "Metaspace" and pre.get("prepend_scheme", "always") != "never"


def _merge_list(model: dict) -> list[tuple[str, str]]:
    return [
        tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m)
        for m in model.get("merges") or []
    ]


def _sentencepiece_scores(tokens: list[str], model: dict) -> list[float]:
    """Scores that make llama.cpp's SentencePiece merging follow the BPE merge order.

    llama.cpp joins, at each step, the neighbouring pair whose joined text is the
    highest-scoring vocabulary entry. A token made by merge ``r`` scores ``-r``; every other
    token (characters, bytes, specials: never the product of a merge) scores below all of
    them, so it is formed last if ever, as BPE never forms it.
    """
    rank: dict[str, int] = {}
    for r, (a, b) in enumerate(_merge_list(model)):
        rank.setdefault(a + b, r)
    floor = -float(len(rank) + 1)
    return [-float(rank[t]) if t in rank else floor for t in tokens]


def tokenizer_metadata(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> dict[str, Any]:
    """The ``tokenizer.*`` GGUF keys of a byte-level BPE tokenizer (GGUF model "gpt2") or a
    SentencePiece-style one (model "llama": Gemma's), padded to ``vocab_size``.

    Raises:
        GGUFExportError: not a fast BPE tokenizer of either kind, or more tokens than
            ``vocab_size`` rows in the embedding.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise GGUFExportError("GGUF export needs a fast (tokenizer.json) tokenizer")
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    decoder = spec.get("decoder") or {}
    sentencepiece = model.get("type") == "BPE" and _is_sentencepiece(spec)
    if model.get("type") != "BPE" or not (sentencepiece or decoder.get("type") == "ByteLevel"):
        raise GGUFExportError(
            f"GGUF export writes byte-level or SentencePiece-style (byte-fallback) BPE "
            f"tokenizers only, this one is {model.get('type')} with a {decoder.get('type')} "
            "decoder"
        )
    if sentencepiece and not _merges_across_words(spec):
        raise GGUFExportError(
            f"GGUF export: this SentencePiece-style tokenizer splits text into words first "
            f"({spec.get('pre_tokenizer')}), which llama.cpp's SentencePiece merging does not: "
            "its ids would differ"
        )
    vocab: dict[str, int] = dict(model["vocab"])
    kinds = {}
    for added in spec.get("added_tokens") or []:
        vocab[added["content"]] = added["id"]
        kinds[added["id"]] = CONTROL if added.get("special") else USER_DEFINED
    n = max(vocab.values()) + 1
    if n > vocab_size:
        raise GGUFExportError(f"tokenizer has {n} tokens but the embedding only {vocab_size} rows")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [UNUSED] * vocab_size  # for rows no token maps to
    for token, i in vocab.items():
        tokens[i] = token
        types[i] = kinds.get(i, NORMAL)

    def token_id(name: str) -> int | None:
        value = getattr(tokenizer, f"{name}_token_id", None)
        return int(value) if value is not None else None

    bos = token_id("bos")
    out: dict[str, Any] = {
        "bos": bos,
        "eos": token_id("eos"),
        "unk": token_id("unk"),
        "pad": token_id("pad"),
        # Whether encoding prepends BOS, as the runtime should when it tokenizes a prompt.
        "add_bos": bool(
            bos is not None
            and tokenizer("a")["input_ids"][:1] == [bos]
            and tokenizer("a", add_special_tokens=False)["input_ids"][:1] != [bos]
        ),
        "chat_template": tokenizer.chat_template
        if isinstance(tokenizer.chat_template, str)
        else None,
    }
    if not sentencepiece:
        merges = [" ".join(m) for m in _merge_list(model)]
        pre = pre_tokenizer_name(spec.get("pre_tokenizer"), bool(model.get("ignore_merges")))
        return out | {
            "model": "gpt2",
            "pre": pre,
            "tokens": tokens,
            "token_types": types,
            "merges": merges,
            "scores": None,
        }
    for i, token in enumerate(tokens):
        if types[i] == NORMAL and _BYTE_TOKEN.match(token):
            types[i] = BYTE
    if out["unk"] is not None:
        types[out["unk"]] = UNKNOWN
    return out | {
        "model": "llama",
        "pre": "default",
        "tokens": tokens,
        "token_types": types,
        "merges": [],
        "scores": _sentencepiece_scores(tokens, model),
        "add_space_prefix": _adds_space_prefix(spec),
    }


def add_tokenizer_metadata(writer: Any, tok: dict[str, Any]) -> None:
    """The ``tokenizer.ggml.*`` keys and the chat template (:func:`tokenizer_metadata`)."""
    writer.add_tokenizer_model(tok["model"])
    writer.add_tokenizer_pre(tok["pre"])
    writer.add_token_list(tok["tokens"])
    writer.add_token_types(tok["token_types"])
    if tok["scores"] is not None:
        writer.add_token_scores(tok["scores"])
        writer.add_add_space_prefix(tok["add_space_prefix"])
    elif tok["merges"]:
        writer.add_token_merges(tok["merges"])
    else:
        # A vocabulary of single symbols has no merges; readers then rebuild merges from
        # scores, and with the id order as score they find none, as it should be.
        writer.add_token_scores([-float(i) for i in range(len(tok["tokens"]))])
    for key, add in (
        ("bos", writer.add_bos_token_id),
        ("eos", writer.add_eos_token_id),
        ("unk", writer.add_unk_token_id),
        ("pad", writer.add_pad_token_id),
    ):
        if tok[key] is not None:
            add(tok[key])
    writer.add_add_bos_token(tok["add_bos"])
    if tok["chat_template"]:
        writer.add_chat_template(tok["chat_template"])
