"""Prefill and decode speed of one loaded model, at batch size 1 and at ``eval.decode_batch_size``.

Every rate is the median over ``eval.repeats`` timed runs after one untimed warm-up run, so
one slow run (a neighbour on a shared CPU) does not move it. Eager decode times the whole
greedy ``generate`` call, prefill included; the compiled decode of
:mod:`distill.evaluate.compiled_decode` times its decode steps only. Every runtime, llama.cpp
included (:mod:`distill.evaluate.gguf_runtime`), decodes after :func:`decode_prompt` and
prefills :func:`prefill_prompt`. :func:`deployed_fields` names the speed a torch row deploys
at: compiled decode when it was measured, else eager.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from distill.config import EvalConfig
from distill.evaluate.metrics import model_device

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)


def median_rate(num_items: int, seconds: Sequence[float]) -> float:
    """``num_items`` per second at the median of ``seconds`` (robust to one slow run)."""
    return num_items / max(statistics.median(seconds), 1e-12)


def sync(device: torch.device) -> None:
    """Wait for the device's queued kernels (CUDA runs them asynchronously); no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_runs(fn: Callable[[], object], repeats: int, device: torch.device) -> list[float]:
    """Wall seconds of ``repeats`` calls of ``fn`` after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        # CUDA kernels run asynchronously; without this the clock stops at launch.
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


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


def measure_decode(
    model: PreTrainedModel, prompt: torch.Tensor, new_tokens: int, repeats: int
) -> float:
    """New tokens per second of greedy ``generate`` after ``prompt``, all sequences together.

    The time covers the whole ``generate`` call (the prompt's prefill included), divided by
    the ``B * new_tokens`` it must produce: ``min_new_tokens = max_new_tokens`` so an early EOS
    cannot shorten the run and flatter a variant.

    Args:
        prompt: ``(B, P)`` token ids (B sequences decoded as one batch).

    Raises:
        RuntimeError: ``generate`` produced another number of tokens.
    """
    device = model_device(model)
    ids = prompt.to(device)
    gen_cfg = greedy_generation_config(model, new_tokens)
    attention_mask = torch.ones_like(ids)

    def generate() -> object:
        out = model.generate(
            input_ids=ids, attention_mask=attention_mask, generation_config=gen_cfg
        )
        if out.shape[1] != ids.shape[1] + new_tokens:
            raise RuntimeError(f"generate produced {out.shape[1] - ids.shape[1]} != {new_tokens}")
        return out

    return median_rate(ids.shape[0] * new_tokens, time_runs(generate, repeats, device))


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
    decode_rate = measure_decode(model, prompt, cfg.decode_tokens, cfg.repeats)
    batch_rate = None
    if cfg.decode_batch_size > 1:
        need = cfg.decode_batch_size * prompt_len
        prompts = (
            flat[:, :need] if flat.shape[1] >= need else prompt.repeat(1, cfg.decode_batch_size)
        )
        batch_rate = measure_decode(
            model,
            prompts.reshape(cfg.decode_batch_size, prompt_len),
            cfg.decode_tokens,
            cfg.repeats,
        )
    return {
        "prefill_tokens_per_s": prefill_rate,
        "prefill_tokens": prefill_len,
        "decode_tokens_per_s": decode_rate,
        "decode_tokens": cfg.decode_tokens,
        "prompt_tokens": prompt_len,
        "decode_batch_size": cfg.decode_batch_size if batch_rate is not None else None,
        "decode_tokens_per_s_batch": batch_rate,
    }


def compiled_decode_fields(
    name: str, model: PreTrainedModel, prompt: torch.Tensor, cfg: EvalConfig
) -> dict[str, Any]:
    """Batch-1 compiled decode (:mod:`distill.evaluate.compiled_decode`) as report row fields.

    Empty when ``name`` matches no ``eval.compiled_decode`` pattern. A variant that fails
    to compile, or whose compiled logits differ from its eager ones, gets its error in
    ``decode_compiled_error`` and no rate: the other variants' figures still stand.
    """
    from fnmatch import fnmatchcase

    from distill.evaluate.compiled_decode import (
        METHOD,
        CompiledDecodeError,
        measure_compiled_decode,
    )

    if not any(fnmatchcase(name, pattern) for pattern in cfg.compiled_decode):
        return {}
    fields: dict[str, Any] = {
        "decode_compiled_method": METHOD,
        "decode_compiled_tokens_per_s": None,
        "decode_compiled_compile_s": None,
        "decode_compiled_max_abs_logit_diff": None,
        "decode_compiled_error": None,
    }
    log.info("%s: compiling for decode (tens of seconds on CPU)", name)
    try:
        with torch.inference_mode():
            result = measure_compiled_decode(
                model, prompt.to(model_device(model)), cfg.decode_tokens, cfg.repeats
            )
    except CompiledDecodeError as err:
        log.warning("%s: compiled decode not measured: %s", name, err)
        fields["decode_compiled_error"] = str(err)
        return fields
    fields["decode_compiled_tokens_per_s"] = result.tokens_per_s
    fields["decode_compiled_compile_s"] = result.compile_s
    fields["decode_compiled_max_abs_logit_diff"] = result.max_abs_logit_diff
    return fields


# What a torch row's deployed figures are, by how its decode was measured.
COMPILED_RUNTIME = "torch.compile"
EAGER_RUNTIME = "eager"


def deployed_fields(row: dict[str, Any]) -> dict[str, Any]:
    """The speed a torch row deploys at, from its eager and compiled figures.

    Decode is the compiled rate when it was measured (``eval.compiled_decode``), else the
    eager one; prefill is always eager (only decode is compiled). ``deployed_runtime`` says
    which, and why when compiled decode is missing.
    """
    compiled = row.get("decode_compiled_tokens_per_s")
    if compiled is not None:
        runtime, decode = COMPILED_RUNTIME, compiled
        how = "torch.compile decode (decode steps only, static KV cache); eager prefill"
    else:
        runtime, decode = EAGER_RUNTIME, row.get("decode_tokens_per_s")
        why = (
            "torch.compile failed, see decode_compiled_error"
            if row.get("decode_compiled_error")
            else "not in eval.compiled_decode"
        )
        how = f"eager decode (whole generate call) and prefill ({why})"
    return {
        "runtime": runtime,
        "deployed_decode_tokens_per_s": decode,
        "deployed_prefill_tokens_per_s": row.get("prefill_tokens_per_s"),
        "deployed_runtime": how,
    }
