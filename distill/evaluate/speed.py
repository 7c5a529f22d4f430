"""Eager PyTorch prefill and decode speed of one loaded model, at batch size 1 and at
``eval.decode_batch_size``, and the prompts every runtime is timed on.

Every rate is the median over ``eval.repeats`` timed runs after one untimed warm-up run
(:mod:`distill.evaluate.timing`), so one slow run (a neighbour on a shared CPU) does not move
it. Eager decode times the whole greedy ``generate`` call, prefill included: a diagnostic,
not a deployment figure (on CPU every batch-1 linear runs as a one-core matrix-vector
product). Every runtime, llama.cpp and compiled PyTorch included, decodes after
:func:`decode_prompt` and prefills :func:`prefill_prompt`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from distill.config import EvalConfig
from distill.evaluate.timing import median_rate, time_runs
from distill.metrics import model_device

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)


def max_positions(config: Any) -> int | None:
    """A model config's context limit (``max_position_embeddings``), None where it states none."""
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if value else None


def measure_prefill(
    model: PreTrainedModel, prompt: torch.Tensor, repeats: int
) -> tuple[float, int]:
    """Prompt tokens per second of one forward pass at batch size 1.

    Args:
        prompt: ``(1, P)`` token ids.

    Returns:
        (tokens per second at the median run, P).
    """
    device = model_device(model)
    ids = prompt.to(device)

    def forward() -> object:
        return model(input_ids=ids, use_cache=False).logits

    return median_rate(ids.shape[1], time_runs(forward, repeats, device)), ids.shape[1]


def greedy_generation_config(model: Any, new_tokens: int) -> Any:
    """Greedy decoding of exactly ``new_tokens`` tokens, whatever the folder's own config says.

    A fresh config: the folder's generation_config may ask for sampling, and
    ``min_new_tokens = max_new_tokens`` keeps an early EOS from shortening a timed run.
    """
    from transformers import GenerationConfig

    eos = model.config.eos_token_id
    pad = model.config.pad_token_id
    if pad is None:  # generate wants one id; some configs list several EOS ids
        pad = eos[0] if isinstance(eos, list) else eos
    return GenerationConfig(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=pad,
    )


# Eager decode diagnostics stop repeating once their timed runs took this long together
# (an eager int8 student at 5 tok/s takes 6 s a run; eval.repeats=3 of them would be 18 s).
EAGER_DECODE_BUDGET_S = 3.0


def measure_decode(
    model: PreTrainedModel, prompt: torch.Tensor, new_tokens: int, repeats: int
) -> tuple[float, int]:
    """New tokens per second of greedy ``generate`` after ``prompt``, all sequences together.

    The time covers the whole ``generate`` call (the prompt's prefill included), divided by
    the ``B * new_tokens`` it must produce: ``min_new_tokens = max_new_tokens`` so an early EOS
    cannot shorten the run and flatter a variant. The untimed warm-up decodes 2 tokens: the
    same kernels (prefill, then a step on the cache) at a fraction of a slow model's cost;
    timed runs stop once they took :data:`EAGER_DECODE_BUDGET_S` together.

    Returns:
        (tokens per second at the median timed run, how many runs were timed).

    Args:
        prompt: ``(B, P)`` token ids (B sequences decoded as one batch).

    Raises:
        RuntimeError: ``generate`` produced another number of tokens.
    """
    device = model_device(model)
    ids = prompt.to(device)
    gen_cfg = greedy_generation_config(model, new_tokens)
    attention_mask = torch.ones_like(ids)

    def generate(config: Any = gen_cfg) -> object:
        out = model.generate(input_ids=ids, attention_mask=attention_mask, generation_config=config)
        if out.shape[1] != ids.shape[1] + config.max_new_tokens:
            made = out.shape[1] - ids.shape[1]
            raise RuntimeError(f"generate produced {made} != {config.max_new_tokens}")
        return out

    warm = greedy_generation_config(model, min(2, new_tokens))
    times = time_runs(
        generate, repeats, device, warmup=lambda: generate(warm), budget_s=EAGER_DECODE_BUDGET_S
    )
    return median_rate(ids.shape[0] * new_tokens, times), len(times)


def decode_prompt(flat: torch.Tensor, cfg: EvalConfig, limit: int | None) -> torch.Tensor:
    """The ``(1, P)`` decode prompt: the first ``eval.prompt_tokens`` of ``flat`` ``(1, L)``,
    cut so that prompt + ``eval.decode_tokens`` fits the context ``limit`` (None: no limit).

    Every runtime (eager, compiled, llama.cpp) decodes after this same prompt."""
    prompt_len = min(cfg.prompt_tokens, flat.shape[1])
    if limit is not None:
        prompt_len = max(1, min(prompt_len, limit - cfg.decode_tokens))
    return flat[:, :prompt_len]


def prefill_prompt(flat: torch.Tensor, cfg: EvalConfig, limit: int | None) -> torch.Tensor:
    """The ``(1, P)`` prefill prompt: the first ``eval.prefill_tokens`` of ``flat`` ``(1, L)``
    that fit the context ``limit`` (None: no limit)."""
    return flat[:, : min(cfg.prefill_tokens, flat.shape[1], limit or flat.shape[1])]


def measure_speed(model: PreTrainedModel, blocks: torch.Tensor, cfg: EvalConfig) -> dict[str, Any]:
    """Prefill and decode rates of ``model`` on held-out text, as report row fields.

    Prompts are cut from ``blocks`` ``(N, T)`` read as one stream: prefill takes the first
    ``eval.prefill_tokens``, decode the first ``eval.prompt_tokens`` (see
    :func:`decode_prompt`), and the batched decode ``eval.decode_batch_size`` distinct
    prompts from consecutive stretches (repeated when the text is too short).
    """
    flat = blocks.reshape(1, -1)
    limit = max_positions(model.config)
    prefill_rate, prefill_len = measure_prefill(
        model, prefill_prompt(flat, cfg, limit), cfg.repeats
    )
    prompt = decode_prompt(flat, cfg, limit)
    prompt_len = prompt.shape[1]
    decode_rate, decode_runs = measure_decode(model, prompt, cfg.decode_tokens, cfg.repeats)
    batch_rate = None
    if cfg.decode_batch_size > 1:
        need = cfg.decode_batch_size * prompt_len
        prompts = (
            flat[:, :need] if flat.shape[1] >= need else prompt.repeat(1, cfg.decode_batch_size)
        )
        batch_rate, _ = measure_decode(
            model,
            prompts.reshape(cfg.decode_batch_size, prompt_len),
            cfg.decode_tokens,
            cfg.repeats,
        )
    return {
        "prefill_tokens_per_s": prefill_rate,
        "prefill_tokens": prefill_len,
        "decode_tokens_per_s": decode_rate,
        "decode_timed_runs": decode_runs,
        "decode_tokens": cfg.decode_tokens,
        "prompt_tokens": prompt_len,
        "decode_batch_size": cfg.decode_batch_size if batch_rate is not None else None,
        "decode_tokens_per_s_batch": batch_rate,
    }
