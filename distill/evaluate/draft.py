"""The variant as the teacher's draft model: how much of the teacher's greedy output it guesses.

In greedy speculative decoding a draft model proposes ``k`` tokens, the teacher checks them in
one forward pass, keeps the longest prefix that equals its own greedy tokens and adds its own
next token: the output is the teacher's, token for token, and each teacher pass yields
``accepted + 1`` tokens. How many it accepts depends only on whether the draft's greedy
token equals the teacher's at each position of the teacher's own output, given the teacher's
prefix (a draft token is only ever checked after every earlier one in its run was accepted,
so it was conditioned on the teacher's tokens). So one teacher-forced pass of the variant over
the teacher's greedy answers (:func:`torch_matches`, :func:`gguf_matches`) gives the
acceptance at every draft length (:func:`speculation`), in the runtime the variant deploys in.

The measured speed-up of the real thing, with the output checked token for token against the
teacher's own greedy decode: :func:`llama_cpp_speeds` (llama.cpp's speculative decoding, the
teacher's F16 file drafting with a student file; every report times it, ``eval.draft_*``) and
:func:`assisted_speed` (transformers' assisted generation, ``scripts/bench/bench_draft.py``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from itertools import islice
from typing import TYPE_CHECKING, Any

import torch

from distill.evaluate.answers import pad_rows
from distill.metrics import eval_mode, model_device

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from distill.models import LlamaRuntime

# Draft lengths the report gives tokens per teacher pass for.
DRAFT_LENGTHS = (1, 2, 4, 8)


def torch_matches(
    model: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    answers: Sequence[Sequence[int]],
    batch_size: int,
) -> list[list[bool]]:
    """Per answer, per token: whether ``model``'s greedy next token after the prompt and the
    answer's earlier tokens is that token."""
    tokens, mask = pad_rows(prompts, answers)
    out: list[list[bool]] = []
    device = model_device(model)
    with torch.inference_mode(), eval_mode(model):
        for start in range(0, tokens.shape[0], batch_size):
            batch = tokens[start : start + batch_size].to(device)
            guess = model(input_ids=batch).logits[:, :-1].argmax(-1).cpu()
            for r in range(batch.shape[0]):
                scored = mask[start + r, 1:].bool()
                out.append((guess[r][scored] == tokens[start + r, 1:][scored]).tolist())
    return out


def gguf_matches(
    runtime: LlamaRuntime,
    prompts: Sequence[Sequence[int]],
    answers: Sequence[Sequence[int]],
    vocab_size: int,
) -> list[list[bool]]:
    """:func:`torch_matches` from llama.cpp's logits of the open GGUF file."""
    out = []
    for prompt, answer in zip(prompts, answers, strict=True):
        if not answer:
            out.append([])
            continue
        logits = runtime.completion_logits(prompt, answer, vocab_size)
        out.append((logits.argmax(-1) == torch.tensor(list(answer))).tolist())
    return out


def speculation(matches: Sequence[Sequence[bool]], draft_length: int) -> dict[str, float]:
    """Greedy speculative decoding of the teacher's answers with ``draft_length`` draft tokens
    per teacher pass: the share of drafted tokens accepted, and the tokens each teacher pass
    yields (1 without a draft; at most ``draft_length + 1``)."""
    drafted = accepted = passes = produced = 0
    for row in matches:
        pos = 0
        while pos < len(row):
            proposed = min(draft_length, len(row) - pos)
            run = 0
            while run < proposed and row[pos + run]:
                run += 1
            step = min(run + 1, len(row) - pos)
            drafted += proposed
            accepted += run
            passes += 1
            produced += step
            pos += step
    return {
        "acceptance": accepted / drafted if drafted else float("nan"),
        "tokens_per_pass": produced / passes if passes else float("nan"),
    }


def draft_fields(matches: Sequence[Sequence[bool]]) -> dict[str, Any]:
    """A variant's draft figures on one answer set: the share of the teacher's answer tokens
    it guesses, and per draft length the acceptance and tokens per teacher pass."""
    flat = [m for row in matches for m in row]
    return {
        "top1_on_teacher_answers": sum(flat) / len(flat) if flat else float("nan"),
        "by_draft_length": {str(k): speculation(matches, k) for k in DRAFT_LENGTHS},
    }


def assisted_speed(
    teacher: PreTrainedModel,
    draft: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    new_tokens: int,
    draft_length: int,
) -> dict[str, Any]:
    """Wall time of the teacher's greedy decode of ``new_tokens`` after each prompt (batch 1),
    alone and with ``draft`` as transformers' assistant proposing ``draft_length`` tokens a
    pass, and whether every assisted output equals the teacher's own token for token."""
    from transformers import GenerationConfig

    def config(**extra: Any) -> Any:
        return GenerationConfig(
            max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None, **extra
        )

    alone = assisted = 0.0
    identical = True
    device = model_device(teacher)
    with torch.inference_mode(), eval_mode(teacher), eval_mode(draft):
        for prompt in prompts:
            ids = torch.tensor([list(prompt)], device=device)
            start = time.perf_counter()
            want = teacher.generate(input_ids=ids, generation_config=config())
            alone += time.perf_counter() - start
            start = time.perf_counter()
            got = teacher.generate(
                input_ids=ids,
                assistant_model=draft,
                generation_config=config(
                    num_assistant_tokens=draft_length,
                    num_assistant_tokens_schedule="constant",
                    assistant_confidence_threshold=0.0,
                ),
            )
            assisted += time.perf_counter() - start
            identical &= torch.equal(got, want)
    return {
        "draft_length": draft_length,
        "teacher_s": alone,
        "assisted_s": assisted,
        "speedup": alone / assisted if assisted else float("nan"),
        "identical": identical,
    }


def _gguf_draft(path: Any, draft_length: int, threads: int, n_ctx: int) -> Any:
    """A ``llama_cpp.llama_speculative.LlamaDraftModel`` drafting greedily with the GGUF file
    at ``path``: it keeps its own KV cache, re-reading only what changed since its last call
    (llama-cpp-python's ``eval`` drops cached tokens past ``n_tokens``)."""
    import llama_cpp
    from llama_cpp.llama_speculative import LlamaDraftModel

    from distill.models import load_llama

    class GGUFDraft(LlamaDraftModel):
        def __init__(self) -> None:
            self.llm = load_llama(path, n_ctx=n_ctx, threads=threads)

        def __call__(self, input_ids: Any, /, **kwargs: Any) -> Any:
            import numpy as np

            llm = self.llm
            ids = [int(t) for t in input_ids]
            same = 0
            limit = min(llm.n_tokens, len(ids) - 1)  # re-read at least the last token
            while same < limit and int(llm.input_ids[same]) == ids[same]:
                same += 1
            llm.n_tokens = same
            llm.eval(ids[same:])
            out: list[int] = []
            while True:
                last = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
                out.append(int(np.ctypeslib.as_array(last, (llm.n_vocab(),)).argmax()))
                if len(out) == draft_length:
                    return np.array(out, dtype=np.intc)
                llm.eval([out[-1]])

    return GGUFDraft()


def llama_cpp_speeds(
    teacher_path: Any,
    draft_path: Any,
    prompts: Sequence[Sequence[int]],
    new_tokens: int,
    draft_lengths: Sequence[int],
    threads: int,
) -> dict[str, Any]:
    """:func:`assisted_speed` in llama.cpp: the teacher's GGUF decoding greedily alone (once),
    then with llama-cpp-python's speculative decoding drafting with the GGUF at ``draft_path``
    at each of ``draft_lengths``.

    Returns:
        ``{"teacher_s", "answers", "tokens", "by_draft_length": [{"draft_length",
        "assisted_s", "speedup", "identical", "identical_answers", "shared_prefix"}, ...]}``.
    """
    from distill.models import load_llama

    n_ctx = max(len(p) for p in prompts) + new_tokens + max(draft_lengths) + 8

    def decode(draft: Any) -> tuple[list[list[int]], float]:
        llm = load_llama(teacher_path, n_ctx=n_ctx, threads=threads, draft_model=draft)
        outputs, seconds = [], 0.0
        try:
            # Untimed: the first decode of a fresh instance pays for its buffers and caches,
            # which would count against whichever setting runs first.
            for _token in islice(llm.generate(list(prompts[0]), temp=0.0, top_k=1), 4):
                pass
            for prompt in prompts:
                start = time.perf_counter()
                out = []
                for token in llm.generate(list(prompt), temp=0.0, top_k=1, reset=True):
                    out.append(int(token))
                    if len(out) == new_tokens:
                        break
                seconds += time.perf_counter() - start
                outputs.append(out)
        finally:
            llm.close()
        return outputs, seconds

    want, alone = decode(None)
    rows = []
    for k in draft_lengths:
        got, assisted = decode(_gguf_draft(draft_path, k, threads, n_ctx))
        rows.append(
            {
                "draft_length": k,
                "assisted_s": assisted,
                "speedup": alone / assisted if assisted else float("nan"),
                "identical": got == want,
                # llama.cpp checks a draft in one batch, whose kernels round differently from
                # one token's: a near-tie can turn. How many answers stayed the teacher's own,
                # and the tokens they share before the first turn.
                "identical_answers": sum(g == w for g, w in zip(got, want, strict=True)),
                "shared_prefix": sum(_shared(g, w) for g, w in zip(got, want, strict=True)),
            }
        )
    return {
        "teacher_s": alone,
        "answers": len(want),
        "tokens": sum(len(w) for w in want),
        "by_draft_length": rows,
    }


def _shared(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n
