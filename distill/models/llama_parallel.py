"""Greedy answers to many prompts at once in llama.cpp: one sequence per prompt in one batch,
as llama-server's parallel slots decode them (:meth:`distill.models.LlamaRuntime.generate`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class ParallelAnswers:
    """A second llama.cpp context on ``llm``'s loaded weights (a ``llama_cpp.Llama``), holding
    one sequence per prompt, each in its own slice of the KV cache (``llm``'s own context
    keeps one sequence). Raises RuntimeError where llama.cpp refuses it."""

    def __init__(self, llm: Any, prompts: Sequence[Sequence[int]], new: int) -> None:
        import llama_cpp

        self.n_vocab = int(llm.n_vocab())
        self.prompts = [[int(t) for t in p] for p in prompts]
        own = llm.context_params
        params = type(own).from_buffer_copy(own)
        prompt_tokens = sum(len(p) for p in self.prompts)
        params.n_seq_max = len(self.prompts)
        # A cache slice per sequence: in one unified cache every token would attend over
        # (masked) all the sequences' cells, which made a 32-answer step 3x slower here.
        params.kv_unified = False
        # llama.cpp pads a context to 256 cells and splits it evenly: a multiple of both.
        room = -(-(max(len(p) for p in self.prompts) + new) // 256) * 256
        params.n_ctx = len(self.prompts) * room
        params.n_batch = params.n_ubatch = max(prompt_tokens, len(self.prompts))
        self.ctx = llama_cpp.llama_init_from_model(llm.model, params)
        if not self.ctx:
            raise RuntimeError(f"no context for {len(self.prompts)} sequences")
        self.batch = llama_cpp.llama_batch_init(params.n_batch, 0, 1)

    def __enter__(self) -> ParallelAnswers:
        return self

    def __exit__(self, *exc: object) -> None:
        import llama_cpp

        llama_cpp.llama_batch_free(self.batch)
        llama_cpp.llama_free(self.ctx)

    def _decode(self, items: Sequence[tuple[int, int, int, bool]]) -> None:
        """Decode ``(token, position, sequence, wants logits)`` items as one batch."""
        import llama_cpp

        b = self.batch
        b.n_tokens = len(items)
        for j, (token, pos, seq, logits) in enumerate(items):
            b.token[j], b.pos[j], b.n_seq_id[j], b.logits[j] = token, pos, 1, logits
            b.seq_id[j][0] = seq
        code = llama_cpp.llama_decode(self.ctx, b)
        if code != 0:
            raise RuntimeError(f"llama_decode returned {code}")

    def _argmax(self, index: int, keep: int) -> int:
        import llama_cpp
        import numpy as np

        ptr = llama_cpp.llama_get_logits_ith(self.ctx, index)
        return int(np.ctypeslib.as_array(ptr, (self.n_vocab,))[:keep].argmax())

    def answers(
        self, max_new_tokens: int, stops: set[int], keep: int, desc: str | None
    ) -> list[tuple[int, ...]]:
        from tqdm.auto import tqdm

        items = [
            (t, i, s, i == len(p) - 1) for s, p in enumerate(self.prompts) for i, t in enumerate(p)
        ]
        self._decode(items)
        # Each live sequence: where its logits are in the last batch, its next position.
        live = {s: (j, len(self.prompts[s])) for j, (_, _, s, last) in enumerate(items) if last}
        out: list[list[int]] = [[] for _ in self.prompts]
        bar = tqdm(total=max_new_tokens, desc=desc, unit="token", leave=False, disable=desc is None)
        with bar:
            while live:
                step = []
                for s, (index, pos) in live.items():
                    token = self._argmax(index, keep)
                    out[s].append(token)
                    if token not in stops and len(out[s]) < max_new_tokens:
                        step.append((token, pos, s, True))
                bar.update()
                if step:
                    self._decode(step)
                live = {s: (j, pos + 1) for j, (_, pos, s, _) in enumerate(step)}
        return [tuple(a) for a in out]
