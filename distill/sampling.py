"""What a model writes after prompts: batched, seeded generation with a KV cache.

One :func:`generate` serves every part of the pipeline that needs a model's own text: the
teacher's training text and evaluation text (:mod:`distill.teacher_text`), each variant's
answers to the evaluation prompts (:mod:`distill.evaluate.fidelity`), and on-policy samples
during training (:mod:`distill.train.on_policy`). :func:`pad_id` is the one rule for the id
padding is filled with, and :func:`stop_ids` the one for the ids that end an answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from distill.errors import DistillError


class GenerationError(DistillError):
    """Text cannot be generated with these settings."""


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def stop_ids(model: Any) -> list[int]:
    """The ids that end an answer: the generation config's EOS ids, else the model config's."""
    gen = getattr(model, "generation_config", None)
    ids = _ids(getattr(gen, "eos_token_id", None)) if gen is not None else []
    return ids or _ids(model.config.eos_token_id)


def pad_id(model: Any) -> int:
    """An id to fill padding with. Padded positions are masked, so any id the embedding holds
    will do: the pad id, else the first EOS id, else 0 (a config's EOS may lie outside a
    resized vocabulary, as GPT-2's 50256 does in a small one)."""
    vocab = model.get_input_embeddings().num_embeddings
    for candidate in (model.config.pad_token_id, *stop_ids(model)):
        if candidate is not None and 0 <= int(candidate) < vocab:
            return int(candidate)
    return 0


def cache_keyword(model: Any) -> str:
    """The forward's name for the KV cache: ``cache`` where the model takes it (transformers
    >= 5.2x, which warns on ``past_key_values``), else ``past_key_values``: any transformers 5
    is allowed. Model outputs carry the cache under the same name."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def until_stop(row: Sequence[int], stops: Sequence[int]) -> tuple[int, ...]:
    """``row`` up to and including its first id in ``stops`` (all of it when none is)."""
    for i, t in enumerate(row):
        if t in stops:
            return tuple(row[: i + 1])
    return tuple(row)


def generate(
    model: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    batch_size: int,
    desc: str | None = None,
) -> list[tuple[int, ...]]:
    """What ``model`` writes after each prompt: at most ``max_new_tokens`` tokens, up to and
    including its first EOS. Greedy at ``temperature`` 0, else sampled from the full softmax
    at that temperature (no top-k or top-p: the model's own distribution).

    Prompts are left-padded into batches of ``batch_size`` in the given order and decoded with
    the KV cache under ``inference_mode`` (no autograd bookkeeping: the same tokens, ~5%
    faster than ``no_grad``); batch ``b`` samples under ``seed + b`` inside a forked RNG, so
    the call is deterministic and leaves the caller's random state untouched. The tokens are
    returned as Python ints, free of the inference tensors.

    Raises:
        GenerationError: an empty prompt, or settings out of range.
    """
    from transformers import GenerationConfig

    if max_new_tokens < 1 or batch_size < 1 or temperature < 0:
        raise GenerationError(
            f"generate: max_new_tokens={max_new_tokens} and batch_size={batch_size} must be "
            f">= 1, temperature={temperature} >= 0"
        )
    if any(len(p) == 0 for p in prompts):
        raise GenerationError("generate: a prompt has no tokens")
    eos = stop_ids(model)
    pad = pad_id(model)
    sample = temperature > 0
    gen_cfg = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=sample,
        temperature=temperature if sample else None,
        top_k=0 if sample else None,
        top_p=1.0 if sample else None,
        eos_token_id=eos or None,
        pad_token_id=pad,
    )
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[tuple[int, ...]] = []
    batches = [prompts[i : i + batch_size] for i in range(0, len(prompts), batch_size)]
    bar = tqdm(batches, desc=desc, unit="batch", leave=False, disable=desc is None)
    try:
        for b, batch in enumerate(bar):
            width = max(len(p) for p in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, p in enumerate(batch):
                ids[r, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
                mask[r, width - len(p) :] = 1
            devices = [device] if device.type == "cuda" else []
            with torch.inference_mode(), torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed + b)
                new = model.generate(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    generation_config=gen_cfg,
                )[:, width:]
            out.extend(until_stop(row, eos) for row in new.tolist())
    finally:
        model.train(was_training)
    return out
