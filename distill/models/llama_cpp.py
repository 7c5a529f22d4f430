"""llama.cpp, through llama-cpp-python, as the runtime of GGUF files: logits and speed.

A GGUF file is what users deploy (llama.cpp, Ollama, LM Studio), so its quality and speed are
measured in llama.cpp itself rather than in transformers' dequantized reload. Two facts of
llama-cpp-python 0.3.x shape the code below:

* ``Llama.eval`` *appends* to the current sequence; ``reset()`` before every independent block
  makes the next ``eval`` start at position 0. Per-token logits are only kept with
  ``logits_all=True`` (``scores[:n_tokens]``, row ``t`` predicting token ``t + 1``).
* llama.cpp times itself (``llama_perf_context``): a batch of one token counts as decode
  (``t_eval_ms``/``n_eval``), a larger one as prefill (``t_p_eval_ms``/``n_p_eval``). Speed
  is timed on a separate ``logits_all=False`` instance, so prefill does not also compute the
  LM head for every prompt position.

Every instance is quiet (``verbose=False``; llama.cpp would print its load log to stderr); its
error lines are kept and put in the message when a file does not load. Each is closed after
use, so the weights are freed before the next variant loads.
"""

from __future__ import annotations

import ctypes
import logging
import os
import statistics
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from distill.config import DistillError

log = logging.getLogger(__name__)

# The version the project pins (pyproject.toml); the fix named when the import fails.
LLAMA_CPP_REQUIREMENT = "llama-cpp-python==0.3.36"
# ggml_log_level's ERROR in the vendored ggml.h (the binding's _logger.py still maps the older
# numbering, where 3 was ERROR): those lines go into error messages.
_GGML_LOG_ERROR = 4


class LlamaCppError(DistillError):
    """llama.cpp could not load or run a GGUF file (the message names the file)."""


def llama_cpp_problem() -> str | None:
    """Why llama.cpp cannot run here (one line naming the fix), or None when it can."""
    try:
        import llama_cpp  # noqa: F401
    except Exception as err:  # ImportError, or a shared library that fails to load
        return (
            f"llama-cpp-python is not importable ({type(err).__name__}: {err}); install it with "
            f"`pip install {LLAMA_CPP_REQUIREMENT}` (`make setup` does)"
        )
    return None


def runtime_name() -> str:
    """``"llama.cpp <llama-cpp-python version>"``, as report rows name the runtime.

    Raises:
        ImportError: llama-cpp-python is missing (check :func:`llama_cpp_problem` first).
    """
    import llama_cpp

    return f"llama.cpp {llama_cpp.__version__}"


def default_threads() -> int:
    """The cores this process may run on (threads = cores, as llama-bench is run).

    ``os.sched_getaffinity`` rather than ``os.cpu_count``: in a container or under ``taskset``
    the latter counts the host's cores, and llama.cpp with more threads than cores spins.
    """
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


@contextmanager
def open_gguf(path: Path, *, n_ctx: int, logits_all: bool, threads: int | None) -> Iterator[Any]:
    """A quiet ``llama_cpp.Llama`` on ``path`` whose one batch holds ``n_ctx`` tokens; closed after.

    ``n_batch = n_ubatch = n_ctx``: a whole block or prompt is one batch, so llama.cpp
    computes it in one pass and counts it as one prefill.

    Raises:
        LlamaCppError: llama-cpp-python is missing, or llama.cpp refuses the file (its error
            lines, e.g. "wrong number of tensors", are in the message).
    """
    problem = llama_cpp_problem()
    if problem:
        raise LlamaCppError(problem)
    import llama_cpp
    import llama_cpp._logger as binding_log

    errors: list[str] = []

    # llama.cpp logs through one process-wide callback; during the load ours keeps the
    # error lines (verbose=False would drop them) and prints nothing.
    @llama_cpp.llama_log_callback
    def keep(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        if level == _GGML_LOG_ERROR:
            errors.append(text.decode("utf-8", "replace").strip())

    threads = threads or default_threads()
    llama_cpp.llama_log_set(keep, ctypes.c_void_p(0))
    try:
        llm = llama_cpp.Llama(
            str(path),
            n_ctx=n_ctx,
            n_batch=n_ctx,
            n_ubatch=n_ctx,
            n_threads=threads,
            n_threads_batch=threads,
            logits_all=logits_all,
            verbose=False,
        )
    except Exception as err:
        detail = "; ".join(e for e in errors if e) or str(err)
        raise LlamaCppError(f"llama.cpp could not load {path}: {detail}") from err
    finally:
        llama_cpp.llama_log_set(binding_log.llama_log_callback, ctypes.c_void_p(0))
    try:
        yield llm
    finally:
        llm.close()


def iter_gguf_logits(
    path: Path,
    blocks: torch.Tensor | Sequence[Sequence[int]],
    threads: int | None = None,
    *,
    vocab_size: int | None = None,
) -> Iterator[torch.Tensor]:
    """llama.cpp's fp32 logits ``(T_i, V)`` for each block of ``blocks``, in order.

    One model load serves every block; each block starts from an empty KV cache. Row ``t``
    predicts ``blocks[i][t + 1]``, as a transformers forward's logits do.

    Args:
        blocks: ``(N, T)`` token ids, or token sequences of any lengths (a prompt and its
            completion each), the context sized for the longest.
        vocab_size: keep the first ``vocab_size`` columns (the model's vocabulary rows; a
            file's token list may be padded past them). None keeps all of them.

    Raises:
        LlamaCppError: the file does not load or a block fails to decode, or the file has
            fewer than ``vocab_size`` tokens.
    """
    if isinstance(blocks, torch.Tensor):
        if blocks.dim() != 2 or blocks.shape[1] < 1:
            raise ValueError(f"blocks must be (N, T) token ids, got shape {tuple(blocks.shape)}")
        rows: list[list[int]] = blocks.tolist()
    else:
        rows = [[int(t) for t in b] for b in blocks]
        if not rows or min(len(r) for r in rows) < 1:
            raise ValueError("blocks must be non-empty token sequences")
    with open_gguf(path, n_ctx=max(len(r) for r in rows), logits_all=True, threads=threads) as llm:
        n_vocab = llm.n_vocab()
        keep = n_vocab if vocab_size is None else vocab_size
        if keep > n_vocab:
            raise LlamaCppError(f"{path} has {n_vocab} tokens, fewer than the {keep} asked for")
        for row in rows:
            llm.reset()
            try:
                llm.eval(row)
            except RuntimeError as err:  # llama_decode returned an error code
                raise LlamaCppError(f"llama.cpp failed on {path}: {err}") from err
            # scores is reused for the next block: copy the rows out.
            yield torch.tensor(llm.scores[: llm.n_tokens, :keep], dtype=torch.float32)


def gguf_logits(
    path: Path, blocks: torch.Tensor, threads: int | None = None, *, vocab_size: int | None = None
) -> list[torch.Tensor]:
    """:func:`iter_gguf_logits` as a list: one ``(T, V)`` fp32 tensor per block."""
    return list(iter_gguf_logits(path, blocks, threads, vocab_size=vocab_size))


def gguf_log_probs(
    path: Path, blocks: torch.Tensor, threads: int | None = None, *, vocab_size: int | None = None
) -> list[torch.Tensor]:
    """fp32 log-probabilities ``(T, V)`` per block of ``blocks`` ``(N, T)`` from llama.cpp.

    Raises:
        LlamaCppError: see :func:`iter_gguf_logits`.
    """
    return [
        F.log_softmax(x, dim=-1)
        for x in iter_gguf_logits(path, blocks, threads, vocab_size=vocab_size)
    ]


def gguf_tokenize(path: Path, text: str) -> list[int]:
    """The ids llama.cpp's tokenizer (embedded in the file) gives ``text``, as a runtime
    tokenizes a prompt: BOS added when the file asks for it, special tokens parsed.

    Raises:
        LlamaCppError: see :func:`open_gguf`.
    """
    with open_gguf(path, n_ctx=8, logits_all=False, threads=1) as llm:
        return list(llm.tokenize(text.encode("utf-8"), add_bos=True, special=True))


def gguf_generate(
    path: Path,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    stop: Sequence[int],
    threads: int | None = None,
    *,
    vocab_size: int | None = None,
    desc: str | None = None,
) -> list[tuple[int, ...]]:
    """Greedy answers of a GGUF file in llama.cpp: what it writes after each prompt, at most
    ``max_new_tokens`` tokens, up to and including the first token of ``stop``.

    The argmax of llama.cpp's own last logits at every step (cut to ``vocab_size`` columns,
    as the scored rows are), one prompt at a time from an empty KV cache: the file's answers
    as a llama.cpp user would get them with greedy sampling.

    Raises:
        LlamaCppError: the file does not load or fails to decode.
        ValueError: an empty prompt or ``max_new_tokens < 1``.
    """
    import llama_cpp
    import numpy as np
    from tqdm.auto import tqdm

    if max_new_tokens < 1 or any(len(p) == 0 for p in prompts):
        raise ValueError(f"need non-empty prompts and max_new_tokens >= 1, got {max_new_tokens}")
    stops = {int(t) for t in stop}
    n_ctx = max(len(p) for p in prompts) + max_new_tokens
    answers: list[tuple[int, ...]] = []
    with open_gguf(path, n_ctx=n_ctx, logits_all=False, threads=threads) as llm:
        n_vocab = llm.n_vocab()
        keep = n_vocab if vocab_size is None else min(vocab_size, n_vocab)
        for prompt in tqdm(prompts, desc=desc, unit="prompt", leave=False, disable=desc is None):
            llm.reset()
            answer: list[int] = []
            try:
                llm.eval([int(t) for t in prompt])
                while len(answer) < max_new_tokens:
                    ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
                    token = int(np.ctypeslib.as_array(ptr, (n_vocab,))[:keep].argmax())
                    answer.append(token)
                    if token in stops or len(answer) == max_new_tokens:
                        break
                    llm.eval([token])
            except RuntimeError as err:
                raise LlamaCppError(f"llama.cpp failed on {path}: {err}") from err
            answers.append(tuple(answer))
    return answers


def _timed_pass(llm: Any, tokens: Sequence[int], new_tokens: int) -> Any:
    """One run from an empty cache: ``tokens`` as one batch, then ``new_tokens`` greedy
    one-token decodes. Returns llama.cpp's perf counters for exactly this run."""
    import llama_cpp
    import numpy as np

    llm.reset()
    llama_cpp.llama_perf_context_reset(llm.ctx)
    llm.eval(list(tokens))
    n_vocab = llm.n_vocab()
    for _ in range(new_tokens):
        # Reading the last logits synchronizes, so each step is timed as its own decode
        # (llama.cpp lumps unsynchronized decodes together); argmax is greedy decoding.
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), (n_vocab,))
        llm.eval([int(logits.argmax())])
    llama_cpp.llama_synchronize(llm.ctx)
    return llama_cpp.llama_perf_context(llm.ctx)


def gguf_speed(
    path: Path,
    prompt: torch.Tensor,
    new_tokens: int,
    repeats: int,
    threads: int | None = None,
    *,
    prefill: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Batch-1 prefill and greedy decode tokens/s of a GGUF file in llama.cpp.

    Every rate is the median of ``repeats`` runs after one untimed warm-up, each from an
    empty KV cache, timed by llama.cpp itself (``llama_perf_context``): prefill over the
    ``prefill`` tokens as one batch, decode over ``new_tokens`` one-token steps after
    ``prompt``. The instance keeps no per-token logits (``logits_all=False``).

    Args:
        prompt: ``(P,)`` token ids before the decode.
        prefill: ``(P2,)`` token ids timed as the prefill (default: ``prompt``).

    Returns:
        ``prefill_tokens_per_s``, ``prefill_tokens``, ``decode_tokens_per_s``,
        ``decode_tokens``, ``prompt_tokens``, ``threads``, ``runtime``.

    Raises:
        LlamaCppError: the file does not load or fails to decode.
        ValueError: ``prompt`` holds fewer than 2 tokens (llama.cpp counts a one-token
            batch as decode), or ``new_tokens``/``repeats`` < 1.
    """
    prefill = prompt if prefill is None else prefill
    if min(prompt.numel(), prefill.numel()) < 2 or new_tokens < 1 or repeats < 1:
        raise ValueError(
            f"need prompts of >= 2 tokens (got {prompt.numel()}, {prefill.numel()}), "
            f"new_tokens >= 1 and repeats >= 1 (got {new_tokens}, {repeats})"
        )
    threads = threads or default_threads()
    n_ctx = max(prefill.numel(), prompt.numel() + new_tokens)
    prefill_ms, decode_ms = [], []
    with open_gguf(path, n_ctx=n_ctx, logits_all=False, threads=threads) as llm:
        try:
            for i in range(repeats + 1):  # run 0 warms up caches and thread pools
                p = _timed_pass(llm, prefill.tolist(), 0)
                d = _timed_pass(llm, prompt.tolist(), new_tokens)
                if i:
                    prefill_ms.append(p.t_p_eval_ms / max(p.n_p_eval, 1))
                    decode_ms.append(d.t_eval_ms / max(d.n_eval, 1))
        except RuntimeError as err:
            raise LlamaCppError(f"llama.cpp failed on {path}: {err}") from err
    return {
        "prefill_tokens_per_s": 1e3 / max(statistics.median(prefill_ms), 1e-9),
        "prefill_tokens": int(prefill.numel()),
        "decode_tokens_per_s": 1e3 / max(statistics.median(decode_ms), 1e-9),
        "decode_tokens": new_tokens,
        "prompt_tokens": int(prompt.numel()),
        "threads": threads,
        "runtime": runtime_name(),
    }
