"""llama.cpp, through llama-cpp-python, as the runtime of GGUF files: logits, answers, speed.

A GGUF file is what users deploy (llama.cpp, Ollama, LM Studio), so its quality and speed are
measured in llama.cpp itself rather than in transformers' dequantized reload. :func:`open_gguf`
opens a file once and gives a :class:`LlamaRuntime` that serves everything a report row needs
from it: what the file holds (parameters, tensor bytes), per-token logits, greedy answers,
tokenization and timed prefill and decode. Facts of llama-cpp-python 0.3.x that shape it:

* ``Llama.eval`` *appends* to the current sequence; ``reset()`` before every independent
  sequence makes the next ``eval`` start at position 0. Per-token logits come back for every
  position of a batch while the instance asks for all of them (``scores[:n_tokens]``, row
  ``t`` predicting token ``t + 1``); the timed passes ask for the last position only, so a
  prefill does not also compute the LM head for every prompt position (:func:`_last_only`).
* llama.cpp times itself (``llama_perf_context``): a batch of one token counts as decode
  (``t_eval_ms``/``n_eval``), a larger one as prefill (``t_p_eval_ms``/``n_p_eval``).

Every instance is quiet (``verbose=False``; llama.cpp would print its load log to stderr); its
error lines are kept and put in the message when a file does not load. It is closed when the
``with`` block ends, so the weights are freed before the next variant loads.
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

from distill.errors import DistillError
from distill.models.llama_parallel import ParallelAnswers

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


class LlamaRuntime:
    """One GGUF file open in llama.cpp (a quiet ``llama_cpp.Llama`` whose batch holds its
    whole context). Made by :func:`open_gguf`."""

    def __init__(self, llm: Any, path: Path, threads: int, n_ctx: int) -> None:
        self.llm = llm
        self.path = path
        self.threads = threads
        # As opened (llama.cpp pads its own context; the binding's logits buffer is this long).
        self.n_ctx = n_ctx

    @property
    def n_vocab(self) -> int:
        return int(self.llm.n_vocab())

    def params(self) -> int:
        """The weights the file stores, in logical elements (a tied head counted once)."""
        import llama_cpp

        return int(llama_cpp.llama_model_n_params(self.llm.model))

    def tensor_bytes(self) -> int:
        """Bytes of the file's tensor data: what llama.cpp holds and computes on."""
        import llama_cpp

        return int(llama_cpp.llama_model_size(self.llm.model))

    def _keep(self, vocab_size: int | None) -> int:
        n_vocab = self.n_vocab
        if vocab_size is not None and vocab_size > n_vocab:
            raise LlamaCppError(
                f"{self.path} has {n_vocab} tokens, fewer than the {vocab_size} asked for"
            )
        return n_vocab if vocab_size is None else vocab_size

    def _eval(self, tokens: Sequence[int]) -> None:
        try:
            self.llm.eval([int(t) for t in tokens])
        except RuntimeError as err:  # llama_decode returned an error code
            raise LlamaCppError(f"llama.cpp failed on {self.path}: {err}") from err

    def _check_fits(self, length: int) -> None:
        if length > self.n_ctx:
            raise ValueError(f"{length} tokens do not fit the {self.n_ctx}-token context opened")

    def iter_logits(
        self, rows: Sequence[Sequence[int]], vocab_size: int | None = None
    ) -> Iterator[torch.Tensor]:
        """llama.cpp's fp32 logits ``(T_i, V)`` for each token sequence of ``rows``, in order,
        each from an empty KV cache. Row ``t`` predicts ``rows[i][t + 1]``, as a transformers
        forward's logits do.

        Each item is a view of llama-cpp-python's logits buffer, valid until the next one is
        computed (no copy of a block's logits is made): use it, or copy it, before asking for
        the next.

        Args:
            vocab_size: keep the first ``vocab_size`` columns (the model's vocabulary rows; a
                file's token list may be padded past them). None keeps all of them.

        Raises:
            LlamaCppError: a sequence fails to decode, or the file has fewer than
                ``vocab_size`` tokens.
        """
        keep = self._keep(vocab_size)
        for row in rows:
            self._check_fits(len(row))
            self.llm.reset()
            self._eval(row)
            yield torch.from_numpy(self.llm.scores[: self.llm.n_tokens, :keep])

    def completion_logits(
        self, prompt: Sequence[int], completion: Sequence[int], vocab_size: int | None = None
    ) -> torch.Tensor:
        """fp32 logits ``(len(completion), V)`` of the positions that predict each completion
        token (the prompt's last position, then every completion token but the last), from
        an empty KV cache. The prompt is read for its cache with the LM head computed at its
        last position only, so scoring a completion costs no logits for its prompt.

        Raises:
            LlamaCppError: the file fails to decode, or has fewer than ``vocab_size`` tokens.
            ValueError: an empty prompt or completion, or more tokens than the context opened.
        """
        if not prompt or not completion:
            raise ValueError("need a non-empty prompt and completion")
        keep = self._keep(vocab_size)
        self._check_fits(len(prompt) + len(completion) - 1)  # the last token is never read
        self.llm.reset()
        with _last_only(self.llm):
            self._eval(prompt)
        first = torch.from_numpy(self._last_logits(keep).copy())[None]
        if len(completion) == 1:
            return first
        start = self.llm.n_tokens
        self._eval(completion[:-1])
        rest = torch.from_numpy(self.llm.scores[start : start + len(completion) - 1, :keep])
        return torch.cat([first, rest])

    def tokenize(self, text: str) -> list[int]:
        """The ids llama.cpp's tokenizer (embedded in the file) gives ``text``, as a runtime
        tokenizes a prompt: BOS added when the file asks for it, special tokens parsed."""
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=True))

    def _last_logits(self, keep: int) -> Any:
        import llama_cpp
        import numpy as np

        ptr = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, (self.n_vocab,))[:keep]

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        stop: Sequence[int],
        *,
        vocab_size: int | None = None,
        desc: str | None = None,
    ) -> list[tuple[int, ...]]:
        """Greedy answers: what the file writes after each prompt, at most ``max_new_tokens``
        tokens, up to and including the first token of ``stop``.

        The argmax of llama.cpp's own logits at every step (cut to ``vocab_size`` columns, as
        the scored rows are). Every prompt is its own sequence in one llama.cpp batch, as
        llama-server's parallel slots decode them: each step decodes one token of every
        unfinished answer together, which on CPU costs little more than one (every step
        reads all the weights either way). Each answer attends to its own prompt only.

        Raises:
            LlamaCppError: the file fails to decode.
            ValueError: an empty prompt, ``max_new_tokens < 1``, or a prompt and its answer
                longer than the context opened.
        """
        if max_new_tokens < 1 or any(len(p) == 0 for p in prompts):
            raise ValueError(
                f"need non-empty prompts and max_new_tokens >= 1, got {max_new_tokens}"
            )
        for prompt in prompts:
            self._check_fits(len(prompt) + max_new_tokens)
        if not prompts:
            return []
        keep = min(vocab_size or self.n_vocab, self.n_vocab)
        try:
            with ParallelAnswers(self.llm, prompts, max_new_tokens) as parallel:
                return parallel.answers(max_new_tokens, {int(t) for t in stop}, keep, desc)
        except RuntimeError as err:  # llama.cpp refused the context or a batch
            raise LlamaCppError(f"llama.cpp failed on {self.path}: {err}") from err

    def _timed_pass(self, tokens: Sequence[int], new_tokens: int) -> Any:
        """One run from an empty cache: ``tokens`` as one batch, then ``new_tokens`` greedy
        one-token decodes. Returns llama.cpp's perf counters for exactly this run."""
        import llama_cpp

        self.llm.reset()
        llama_cpp.llama_perf_context_reset(self.llm.ctx)
        self._eval(tokens)
        for _ in range(new_tokens):
            # Reading the last logits synchronizes, so each step is timed as its own decode
            # (llama.cpp lumps unsynchronized decodes together); argmax is greedy decoding.
            self._eval([int(self._last_logits(self.n_vocab).argmax())])
        llama_cpp.llama_synchronize(self.llm.ctx)
        return llama_cpp.llama_perf_context(self.llm.ctx)

    def speed(
        self,
        prompt: torch.Tensor,
        new_tokens: int,
        repeats: int,
        *,
        prefill: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        """Batch-1 prefill and greedy decode tokens/s, timed by llama.cpp itself
        (``llama_perf_context``).

        Every rate is the median of ``repeats`` runs after one untimed warm-up, each from an
        empty KV cache: prefill over the ``prefill`` tokens as one batch, decode over
        ``new_tokens`` one-token steps after ``prompt``. Only the last position's logits are
        computed in these runs.

        Args:
            prompt: ``(P,)`` token ids before the decode.
            prefill: ``(P2,)`` token ids timed as the prefill (default: ``prompt``).

        Returns:
            ``prefill_tokens_per_s``, ``prefill_tokens``, ``decode_tokens_per_s``,
            ``decode_tokens``, ``prompt_tokens``, ``threads``, ``runtime``.

        Raises:
            LlamaCppError: the file fails to decode.
            ValueError: ``prompt`` holds fewer than 2 tokens (llama.cpp counts a one-token
                batch as decode), ``new_tokens``/``repeats`` < 1, or a pass longer than the
                context opened.
        """
        prefill = prompt if prefill is None else prefill
        if min(prompt.numel(), prefill.numel()) < 2 or new_tokens < 1 or repeats < 1:
            raise ValueError(
                f"need prompts of >= 2 tokens (got {prompt.numel()}, {prefill.numel()}), "
                f"new_tokens >= 1 and repeats >= 1 (got {new_tokens}, {repeats})"
            )
        self._check_fits(max(prefill.numel(), prompt.numel() + new_tokens))
        prefill_ms, decode_ms = [], []
        with _last_only(self.llm):
            for i in range(repeats + 1):  # run 0 warms up caches and thread pools
                p = self._timed_pass(prefill.tolist(), 0)
                d = self._timed_pass(prompt.tolist(), new_tokens)
                if i:
                    prefill_ms.append(p.t_p_eval_ms / max(p.n_p_eval, 1))
                    decode_ms.append(d.t_eval_ms / max(d.n_eval, 1))
        return {
            "prefill_tokens_per_s": 1e3 / max(statistics.median(prefill_ms), 1e-9),
            "prefill_tokens": int(prefill.numel()),
            "decode_tokens_per_s": 1e3 / max(statistics.median(decode_ms), 1e-9),
            "decode_tokens": new_tokens,
            "prompt_tokens": int(prompt.numel()),
            "threads": self.threads,
            "runtime": runtime_name(),
        }


@contextmanager
def _last_only(llm: Any) -> Iterator[None]:
    """Evaluate with logits kept for the last position of each batch only.

    llama-cpp-python 0.3.x keeps its per-instance choice in ``Llama._logits_all`` (read by
    ``eval`` for every batch); the pinned version is checked for it when the file opens."""
    before = llm._logits_all
    llm._logits_all = False
    try:
        yield
    finally:
        llm._logits_all = before


@contextmanager
def quiet_llama_log() -> Iterator[list[str]]:
    """llama.cpp prints nothing inside the block; its error lines are collected in the list
    yielded (for the message of the error they explain).

    llama.cpp logs through one process-wide callback: ours replaces the binding's for the
    block (``verbose=False`` alone would drop the error lines too) and is put back after."""
    import llama_cpp
    import llama_cpp._logger as binding_log

    errors: list[str] = []

    @llama_cpp.llama_log_callback
    def keep(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        if level == _GGML_LOG_ERROR:
            errors.append(text.decode("utf-8", "replace").strip())

    llama_cpp.llama_log_set(keep, ctypes.c_void_p(0))
    try:
        yield errors
    finally:
        llama_cpp.llama_log_set(binding_log.llama_log_callback, ctypes.c_void_p(0))


def load_llama(path: Path, *, n_ctx: int, threads: int, **options: Any) -> Any:
    """A quiet ``llama_cpp.Llama`` of the GGUF file at ``path`` (``options`` go to it as they
    are); the caller closes it.

    Raises:
        LlamaCppError: llama-cpp-python is missing, or llama.cpp refuses the file (its error
            lines, e.g. "wrong number of tensors", are in the message).
    """
    problem = llama_cpp_problem()
    if problem:
        raise LlamaCppError(problem)
    import llama_cpp

    with quiet_llama_log() as errors:
        try:
            return llama_cpp.Llama(
                str(path),
                n_ctx=n_ctx,
                n_threads=threads,
                n_threads_batch=threads,
                verbose=False,
                **options,
            )
        except Exception as err:
            detail = "; ".join(e for e in errors if e) or str(err)
            raise LlamaCppError(f"llama.cpp could not load {path}: {detail}") from err


@contextmanager
def open_gguf(path: Path, *, n_ctx: int, threads: int | None = None) -> Iterator[LlamaRuntime]:
    """``path`` open in llama.cpp with room for ``n_ctx`` tokens, closed after the block.

    ``n_batch = n_ubatch = n_ctx``: a whole sequence is one batch, so llama.cpp computes it in
    one pass and counts it as one prefill. Logits are kept for every position (scoring);
    the timed and generating passes switch that off for themselves.

    Raises:
        LlamaCppError: llama-cpp-python is missing, or llama.cpp refuses the file (its error
            lines, e.g. "wrong number of tensors", are in the message).
    """
    threads = threads or default_threads()
    llm = load_llama(  # names the fix when the binding is missing, before any import of it
        path, n_ctx=n_ctx, threads=threads, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True
    )
    import llama_cpp

    try:
        if not hasattr(llm, "_logits_all"):
            raise LlamaCppError(
                f"llama-cpp-python {llama_cpp.__version__} keeps no Llama._logits_all; distill "
                f"is written for {LLAMA_CPP_REQUIREMENT} (`make setup` installs it)"
            )
        yield LlamaRuntime(llm, Path(path), threads, n_ctx)
    finally:
        llm.close()


def _rows(blocks: torch.Tensor | Sequence[Sequence[int]]) -> list[list[int]]:
    if isinstance(blocks, torch.Tensor):
        if blocks.dim() != 2 or blocks.shape[1] < 1:
            raise ValueError(f"blocks must be (N, T) token ids, got shape {tuple(blocks.shape)}")
        return blocks.tolist()
    rows = [[int(t) for t in b] for b in blocks]
    if not rows or min(len(r) for r in rows) < 1:
        raise ValueError("blocks must be non-empty token sequences")
    return rows


def gguf_logits(
    path: Path,
    blocks: torch.Tensor | Sequence[Sequence[int]],
    threads: int | None = None,
    *,
    vocab_size: int | None = None,
) -> list[torch.Tensor]:
    """:meth:`LlamaRuntime.iter_logits` of one file opened for these blocks alone: one
    ``(T_i, V)`` fp32 tensor per block (``(N, T)`` ids, or sequences of any lengths).

    Raises:
        LlamaCppError: as :func:`open_gguf` and :meth:`LlamaRuntime.iter_logits`.
    """
    rows = _rows(blocks)
    with open_gguf(path, n_ctx=max(len(r) for r in rows), threads=threads) as rt:
        return [x.clone() for x in rt.iter_logits(rows, vocab_size)]


def gguf_tokenize(path: Path, text: str) -> list[int]:
    """:meth:`LlamaRuntime.tokenize` of one file opened for it alone.

    Raises:
        LlamaCppError: see :func:`open_gguf`.
    """
    with open_gguf(path, n_ctx=8, threads=1) as rt:
        return rt.tokenize(text)
