"""Greedy decode through ``torch.compile``: the speed the same weights reach once compiled.

Why a second decode measurement. Eager ``generate`` at batch 1 runs every linear as a
matrix-vector product. On this project's 2-core CPU, PyTorch hands those to MKL, which
used one core: the 49152 x 576 LM head streamed 11.6 GB/s with 1 or 2 torch threads alike,
against 32 GB/s copy bandwidth (and OpenBLAS through numpy reached 29 GB/s on the same
matrix). So the eager decode of any fp32 model sits near 30% of the bandwidth bound,
a kernel limit and not a model property. inductor with weight freezing and its C++ GEMM
template (``max_autotune``) packs every weight once and streams it on every core; on the
default run's student it decoded 80 tokens/s against eager's 30 (the bound is ~100).

How it is measured, so the number can be trusted:

* a static KV cache (``transformers.StaticCache``), so every decode step has one shape and
  compiles once; the prompt's prefill runs eagerly, as ``generate`` does;
* the compiled model first replays the eager greedy tokens (teacher forcing) and its logits
  must match the eager ones (:data:`LOGIT_RTOL` of the largest logit) or the rate is not
  reported; the error says by how much they differed;
* one untimed free-running pass follows (anything left to compile happens there), then the
  timed runs, which skip dynamo's guard checks (they repeat that pass exactly); all reuse
  that one cache (``reset()`` between runs): inductor freezing treats
  the cache's statically marked buffers as part of the compiled graph, and a fresh cache
  object failed with an out-of-bounds write in the measurements that shaped this module;
* time covers the ``new_tokens - 1`` compiled decode steps, not the prompt's prefill (a
  compute-bound pass the bandwidth bound does not model): tokens/s = ``B * (new_tokens - 1)``
  / median seconds. The eager figure (:func:`distill.evaluate.speed.measure_decode`) times the
  whole ``generate`` call, prefill included, so it is the more conservative of the two.

Compiling needs a C++ compiler (inductor's CPU backend) and takes tens of seconds per model
(30-40 s for the 14-layer student here); the frozen, packed weight copies are released
(``torch._dynamo.reset()``) before the call returns.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from distill.config import EvalConfig
from distill.evaluate.timing import median_rate
from distill.metrics import model_device
from distill.sampling import cache_keyword

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

# inductor settings for CPU decode: freeze weights as constants (lets the GEMM template
# pre-pack them) and autotune GEMMs between the C++ template and ATen's kernels. Applied with
# torch._inductor.config.patch: given as torch.compile(options=...) instead, freezing did
# not take effect here (the generated code kept ATen's extern mm for every linear).
INDUCTOR_OPTIONS: dict[str, Any] = {
    "freezing": True,
    "max_autotune": True,
    "max_autotune_gemm_backends": "CPP,ATEN",
    # max_autotune writes a table of kernel timings per GEMM shape to stderr (dozens of
    # lines per model); the choice it makes is what matters, not the table.
    "autotune_num_choices_displayed": 0,
    "max_autotune_report_choices_stats": False,
}
# The attention the compiled decode runs (restored after). One query token against a
# static cache: inductor fuses the plain matmul-softmax-matmul ("eager") into its own
# kernels, while "sdpa" stays one ATen flash-attention call per layer, ~1.5 ms of an 8.6 ms
# int8 step here (profiled); the int8 student decoded 176-184 tok/s with it against 143.
DECODE_ATTENTION = "eager"
# What every compiled decode does; the attention and guard steps are added by
# measure_compiled_decode only where they ran (CompiledDecode.method).
BASE_METHOD = (
    "torch.compile(fullgraph, static shapes), inductor freezing + max_autotune (CPP,ATEN "
    "GEMMs), transformers StaticCache, eager prefill not timed, greedy"
)
# Compiled and eager logits on the same tokens must agree to this fraction of the largest
# |logit|: fp32 GEMMs with another summation order differ by ~1e-5 of it (8.8e-5 absolute
# on logits of ~20, measured); half-precision models get a wider margin.
LOGIT_RTOL = {torch.float32: 1e-3, torch.bfloat16: 3e-2, torch.float16: 3e-2}


class CompiledDecodeError(RuntimeError):
    """The compiled model could not be built, or its logits do not match the eager model's."""


@dataclass(frozen=True)
class CompiledDecode:
    tokens_per_s: float
    compile_s: float
    max_abs_logit_diff: float
    # How it was measured: BASE_METHOD plus the optional steps that ran.
    method: str = BASE_METHOD


Forward = Callable[..., Any]


@contextlib.contextmanager
def _decode_attention(model: Any) -> Iterator[str]:
    """Run ``model`` with :data:`DECODE_ATTENTION` inside, its own attention restored after;
    yields the attention the decode ran with, as the method text states it.

    A model without ``set_attn_implementation`` (or already on it) is left as it is."""
    setter = getattr(model, "set_attn_implementation", None)
    previous = getattr(model.config, "_attn_implementation", None)
    if previous == DECODE_ATTENTION:
        yield f"{DECODE_ATTENTION} attention"
        return
    if setter is None or previous is None:
        yield f"the model's own attention ({previous or 'unknown'})"
        return
    setter(DECODE_ATTENTION)
    try:
        yield f"{DECODE_ATTENTION} attention (switched from {previous} for the decode)"
    finally:
        setter(previous)


def _skip_guard_checks() -> tuple[Any, str]:
    """``torch.compiler.set_stance(skip_guard_eval_unsafe=True)`` where torch has it (2.7+;
    the project allows 2.6), else a no-op: the timed runs then pay the guard checks. With
    the phrase the method text states."""
    import inspect

    stance = getattr(torch.compiler, "set_stance", None)
    if stance is None or "skip_guard_eval_unsafe" not in inspect.signature(stance).parameters:
        return contextlib.nullcontext(), "dynamo's guard checks run in timed runs"
    return (
        stance("default", skip_guard_eval_unsafe=True),
        "guard checks skipped in timed runs",
    )


def greedy_static(
    model: PreTrainedModel,
    step: Forward,
    prompt: torch.Tensor,
    new_tokens: int,
    cache: Any,
    forced: torch.Tensor | None = None,
    steps_context: AbstractContextManager[Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Greedy decode of ``new_tokens`` after ``prompt`` on a static cache.

    The prompt is prefilled by ``model`` (eager); each later token by ``step`` (the model
    itself or its compiled form), with explicit positions so no step depends on the cache's
    own bookkeeping for them.

    Args:
        prompt: ``(B, P)`` token ids.
        cache: an empty (or ``reset()``) cache with room for ``P + new_tokens - 1``.
        forced: ``(B, new_tokens)`` tokens to feed instead of the argmax (teacher forcing),
            so two models' logits are compared at the same inputs.
        steps_context: entered around the timed decode steps only (e.g. a profiler).

    Returns:
        ``(tokens (B, new_tokens), last-position logits (B, new_tokens, V), seconds)``:
        ``seconds`` is the wall time of the ``new_tokens - 1`` decode steps (prefill excluded).
    """
    batch, length = prompt.shape
    positions = torch.arange(length, device=prompt.device)
    cache_arg = {cache_keyword(model): cache}
    logits = model(
        input_ids=prompt,
        **cache_arg,
        cache_position=positions,
        position_ids=positions.expand(batch, length),
        use_cache=True,
    ).logits[:, -1]
    all_logits = [logits]
    tokens = [logits.argmax(-1) if forced is None else forced[:, 0]]
    if prompt.device.type == "cuda":
        torch.cuda.synchronize(prompt.device)
    with steps_context or contextlib.nullcontext():
        t0 = time.perf_counter()
        for i in range(1, new_tokens):
            pos = torch.tensor([length + i - 1], device=prompt.device)
            logits = step(
                # Contiguous either way: a forced column and an argmax differ in strides, and a
                # stride change would make dynamo recompile inside a timed run.
                input_ids=tokens[-1].reshape(batch, 1).clone(memory_format=torch.contiguous_format),
                **cache_arg,
                cache_position=pos,
                position_ids=pos.expand(batch, 1),
                use_cache=True,
            ).logits[:, -1]
            all_logits.append(logits)
            tokens.append(logits.argmax(-1) if forced is None else forced[:, i])
        if prompt.device.type == "cuda":
            torch.cuda.synchronize(prompt.device)
        seconds = time.perf_counter() - t0
    return torch.stack(tokens, 1), torch.stack(all_logits, 1), seconds


def measure_compiled_decode(
    model: PreTrainedModel,
    prompt: torch.Tensor,
    new_tokens: int,
    repeats: int,
    steps_context: Callable[[], AbstractContextManager[Any]] | None = None,
) -> CompiledDecode:
    """Tokens/s of greedy decode with the model compiled, checked against the eager model.

    ``steps_context`` makes a context entered around each timed run's decode steps (e.g. a
    profiler, with ``repeats=1``).

    Raises:
        CompiledDecodeError: compiling or running the compiled model failed, or its logits
            differ from the eager model's by more than :data:`LOGIT_RTOL`.
    """
    import torch._inductor.config as inductor_config
    from transformers import StaticCache

    if new_tokens < 2:
        raise ValueError(f"new_tokens={new_tokens}: need >= 2 so at least one step is compiled")
    max_len = prompt.shape[1] + new_tokens
    with torch.no_grad(), _decode_attention(model) as attention:
        eager_cache = StaticCache(config=model.config, max_cache_len=max_len)
        tokens, eager_logits, _ = greedy_static(model, model, prompt, new_tokens, eager_cache)
        del eager_cache
        torch._dynamo.reset()  # one model's graphs at a time; frees the last model's
        try:
            with inductor_config.patch(INDUCTOR_OPTIONS):
                compiled = torch.compile(model, fullgraph=True, dynamic=False)
                cache = StaticCache(config=model.config, max_cache_len=max_len)
                t0 = time.perf_counter()
                _, compiled_logits, _ = greedy_static(
                    model, compiled, prompt, new_tokens, cache, forced=tokens
                )
                compile_s = time.perf_counter() - t0
                diff = (compiled_logits - eager_logits).abs().max().item()
                scale = max(1.0, eager_logits.abs().max().item())
                rtol = LOGIT_RTOL.get(eager_logits.dtype, 3e-2)
                if not diff <= rtol * scale:  # also catches NaN
                    raise CompiledDecodeError(
                        f"compiled logits differ from eager by {diff:.3g} (limit "
                        f"{rtol * scale:.3g}): decode rate not reported"
                    )
                # One untimed free-running pass: anything still to compile for it (a guard
                # the forced pass did not exercise) compiles here, not in a timed run.
                cache.reset()
                greedy_static(model, compiled, prompt, new_tokens, cache)
                times = []
                # The timed runs repeat that pass exactly (same shapes, strides, cache
                # object), so dynamo's guards can only pass again: skipping their evaluation
                # is what a deployed decode loop does, and it was ~1 ms of an 8 ms int8 step
                # here (int8 student: 113 -> 123 tok/s, measured twice).
                skip, guards = _skip_guard_checks()
                with skip:
                    for _ in range(repeats):
                        cache.reset()
                        context = steps_context() if steps_context is not None else None
                        run = greedy_static(
                            model, compiled, prompt, new_tokens, cache, steps_context=context
                        )
                        times.append(run[2])
        except CompiledDecodeError:
            raise
        except Exception as err:  # inductor/dynamo failures come in many types
            raise CompiledDecodeError(f"{type(err).__name__}: {str(err)[:300]}") from err
        finally:
            torch._dynamo.reset()
            gc.collect()
    rate = median_rate(prompt.shape[0] * (new_tokens - 1), times)
    method = f"{BASE_METHOD}, {attention}, {guards}"
    return CompiledDecode(rate, compile_s, diff, method)


def compiled_decode_fields(
    name: str, model: PreTrainedModel, prompt: torch.Tensor, cfg: EvalConfig
) -> dict[str, Any]:
    """Batch-1 compiled decode (:func:`measure_compiled_decode`) as report row fields.

    Empty when ``name`` matches no ``eval.compiled_decode`` pattern. A variant that fails
    to compile, or whose compiled logits differ from its eager ones, gets its error in
    ``decode_compiled_error`` and no rate: the other variants' figures still stand.
    """
    from fnmatch import fnmatchcase

    if not any(fnmatchcase(name, pattern) for pattern in cfg.compiled_decode):
        return {}
    fields: dict[str, Any] = {
        "decode_compiled_method": None,
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
    fields["decode_compiled_method"] = result.method
    fields["decode_compiled_tokens_per_s"] = result.tokens_per_s
    fields["decode_compiled_compile_s"] = result.compile_s
    fields["decode_compiled_max_abs_logit_diff"] = result.max_abs_logit_diff
    return fields
