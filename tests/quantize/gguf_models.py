"""Microscopic models of every architecture the GGUF writer supports, and tokenizers with the
pre-tokenizers llama.cpp names, built in-process (shared by the ``test_gguf*`` files)."""

from __future__ import annotations

import json

import torch

from tests.conftest import CORPUS

ARCHS = ("llama3", "qwen2", "qwen3", "gemma2", "gemma3", "gpt2")
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 50000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # Below the test sequences' length, so all three of llama3's frequency bands are used.
    "original_max_position_embeddings": 64,
}
# Qwen3-0.6B's shape in miniature: head_dim (128) > hidden / heads (16). 128 also because
# transformers' GGUF loader reads no key_length for qwen3 and falls back to that default.
QWEN3_HEAD_DIM = 128
# Digits, contractions in both cases, runs of spaces and newlines: where the regexes differ.
TOKENIZER_TEXT = (
    "Call 5551234 or 12345678 in 2024: it's, I'M, we'LL see.\n\n  Two  spaces\tand a tab. "
    "The quick brown fox 1234 jumps over the lazy dog.<|endoftext|> A distilled student"
)


def arch_model(
    arch: str,
    vocab: int,
    *,
    tie: bool = True,
    context: int = 256,
    seed: int = 0,
    layers: int = 2,
    **overrides,
):
    """A hidden-64 model of ``arch`` (one of :data:`ARCHS`) with ``layers`` decoder blocks, in
    eval mode; ``overrides`` go to its config.

    The depth goes to the config's constructor, not ``overrides``: Qwen configs derive
    per-layer lists (``layer_types``) from it there.

    Weights are drawn at std 0.1 (not transformers' 0.02) so attention is far from uniform
    and a RoPE slip moves the logits by whole units; every bias and norm weight is perturbed
    away from its 0 / 1 init so a misplaced one shows too.
    """
    from transformers import (
        AutoModelForCausalLM,
        Gemma2Config,
        Gemma3TextConfig,
        GPT2Config,
        LlamaConfig,
        Qwen2Config,
        Qwen3Config,
    )

    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context,
        tie_word_embeddings=tie,
        initializer_range=0.1,
    )
    cfg = {
        "llama3": lambda: LlamaConfig(**common, rope_parameters=dict(LLAMA3_ROPE)),
        "qwen2": lambda: Qwen2Config(**common, rope_theta=50000.0),
        "qwen3": lambda: Qwen3Config(**common, head_dim=QWEN3_HEAD_DIM, rope_theta=50000.0),
        "gemma2": lambda: Gemma2Config(**common, **gemma2_shape(layers)),
        "gemma3": lambda: Gemma3TextConfig(**common, **gemma3_shape(layers)),
        "gpt2": lambda: GPT2Config(
            vocab_size=vocab,
            n_embd=64,
            n_layer=layers,
            n_head=4,
            n_positions=context,
            tie_word_embeddings=tie,
            initializer_range=0.1,
            bos_token_id=None,
            eos_token_id=None,
        ),
    }[arch]()
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return perturb_vectors(AutoModelForCausalLM.from_config(cfg).eval())


def _gemma_shape(layers: int) -> dict:
    """What both Gemmas' miniatures share: head_dim above hidden / heads, a window (8)
    shorter than the test sequences, sliding and full layers alternating, no special ids."""
    return dict(
        head_dim=32,
        query_pre_attn_scalar=32,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"] * (layers // 2)
        + ["sliding_attention"] * (layers % 2),
        bos_token_id=None,
        pad_token_id=None,
        eos_token_id=None,
    )


def gemma3_shape(layers: int) -> dict:
    """Gemma 3's traits in miniature (:func:`_gemma_shape`), with the sliding and full layers'
    own RoPE bases and the full layers' RoPE scaled linearly (as Gemma 3 4B and up ship)."""
    return _gemma_shape(layers) | dict(
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "rope_theta": 50000.0, "factor": 2.0},
        },
    )


def gemma2_shape(layers: int) -> dict:
    """Gemma 2's traits in miniature (:func:`_gemma_shape`), with soft-caps low enough (1 on
    the attention scores, 1.5 on the logits) that every score and logit is bent by them:
    llama.cpp's defaults (50, 30) then leave the logits units away."""
    return _gemma_shape(layers) | dict(
        rope_parameters={"rope_type": "default", "rope_theta": 50000.0},
        attn_logit_softcapping=1.0,
        final_logit_softcapping=1.5,
    )


def perturb_vectors(model):
    """``model`` with every bias and norm weight moved away from its 0 / 1 init (a misplaced
    one then shows in the logits)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def pre_tokenized(kind: str, vocab_size: int = 400):
    """A byte-level BPE tokenizer whose pre-tokenizer is ``kind``: "llama3" / "qwen2" (their
    ``Split`` regexes; Llama 3 with ``ignore_merges``, as it ships), "smollm" (single digits),
    or "gpt2".

    Each is trained under GPT-2's regex (digit runs kept whole) on text full of digits and
    only then given its own pre-tokenizer, so every vocabulary holds multi-digit tokens: a
    runtime that splits digits differently from ``kind`` then gives different ids.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from distill.quantize.gguf_tokenizer import LLAMA3_SPLIT, QWEN2_SPLIT

    if kind == "gpt2":
        pre = pre_tokenizers.ByteLevel(add_prefix_space=False)
    elif kind == "smollm":
        pre = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False),
            ]
        )
    else:
        regex = {"llama3": LLAMA3_SPLIT, "qwen2": QWEN2_SPLIT}[kind]
        pre = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok = Tokenizer(models.BPE(ignore_merges=kind == "llama3"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    digits = "Call 5551234 or 12345678 in 2024, 1999 and 123 456 789. " * 8
    tok.train_from_iterator([CORPUS, digits, TOKENIZER_TEXT], trainer=trainer)
    tok.pre_tokenizer = pre
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


SPM_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]


def sentencepiece_tokenizer(vocab_size: int = 400):
    """A SentencePiece-style BPE tokenizer like Gemma's: spaces as ``▁`` (no prefix space),
    the 256 ``<0xNN>`` byte tokens for characters outside the vocabulary, no pre-tokenizer
    (merges may cross words), ``<bos>`` prepended on encoding."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 256, special_tokens=SPM_SPECIALS, show_progress=False
    )
    base = Tokenizer(models.BPE(unk_token="<unk>"))
    base.normalizer = normalizers.Replace(" ", "\u2581")
    base.train_from_iterator([CORPUS, TOKENIZER_TEXT], trainer=trainer)
    spec = json.loads(base.to_str())
    learned = spec["model"]["vocab"]
    # Byte tokens right after the specials, as Gemma's vocabulary has them.
    vocab = {t: i for i, t in enumerate(SPM_SPECIALS)}
    vocab |= {f"<0x{b:02X}>": len(SPM_SPECIALS) + b for b in range(256)}
    for token, _ in sorted(learned.items(), key=lambda kv: kv[1]):
        vocab.setdefault(token, len(vocab))
    merges = [
        tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in spec["model"]["merges"]
    ]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    tok.add_special_tokens(SPM_SPECIALS)
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>",
    )
