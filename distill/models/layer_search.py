"""Choosing which teacher layers a layer-dropped student keeps, by measured perplexity.

Rules of thumb ("keep the first and last layers") can be far off: on SmolLM2-135M keeping
layers 0-6 and 23-29 gives a 14-layer student at perplexity ~10^4 while the teacher is at 17.
:func:`greedy_layer_drop` measures instead: starting from every layer, it removes, one at a
time, the layer whose removal raises perplexity on a few calibration blocks the least, until
``target_layers`` remain. Calibration blocks should come from the train split so that the
selection never sees the validation blocks it is later judged on.

Candidates are scored on the model itself, not on copies: its decoder ``nn.ModuleList`` is
swapped for one holding a subset of its blocks (and always restored). This is exact for
scoring because the forward runs with ``use_cache=False``, so the per-block ``layer_idx`` a
copied block still carries (it indexes the KV cache) is never read; the test checks the
scores against :func:`distill.models.build_student_from_teacher`.

Two savings keep the search exact and make it affordable on a CPU (a candidate costs the LM
head and the loss, about eight llama blocks' worth, plus its blocks):

- Removing kept layer ``j`` leaves the hidden states after layers ``0..j-1`` unchanged, so
  they are computed once per step and fed straight into layer ``j+1``: a candidate runs only
  the layers after it, halving the block work of a step.
- Calibration batches are scored one after another, and cross-entropy is non-negative, so
  once a candidate's partial loss sum exceeds the best complete one it cannot win and is
  abandoned. Candidates are tried in the order of their previous step's score, so most are
  abandoned after the first batch: a small ``batch_size`` prunes more. The chosen layer is
  the same as without pruning; only losers' scores go uncomputed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from distill import metrics
from distill.errors import DistillError
from distill.models.student import build_student_from_teacher, decoder_layers


class LayerSearchError(DistillError):
    """The layer search cannot run with these arguments."""


def _check_blocks(blocks: torch.Tensor, batch_size: int) -> None:
    problem = metrics.blocks_problem(blocks, batch_size)
    if problem:
        raise LayerSearchError(problem)


def _ranked_loss_sum(model: nn.Module, batch: torch.Tensor) -> tuple[float, int]:
    """Summed next-token CE of one ``(B, T)`` batch and its positions, NaN read as ``inf``."""
    loss_sum, count = metrics.batch_ce_sum(model, batch)
    # NaN would compare false both ways and defeat ranking and pruning; it is as bad as inf.
    return (math.inf if math.isnan(loss_sum) else loss_sum), count


def perplexity(model: nn.Module, blocks: torch.Tensor, *, batch_size: int) -> float:
    """:func:`distill.metrics.perplexity` of ``model`` over ``blocks``, NaN as ``inf``.

    Args:
        model: a causal LM (logits at t predict the token at t + 1).
        blocks: ``(N, T)`` token ids, no padding; every block contributes ``T - 1`` tokens.
        batch_size: blocks per forward.

    Returns:
        The perplexity, weighted per token across batches; ``inf`` if the loss overflows or
        is NaN, so that a broken selection ranks last instead of breaking the ranking.

    Raises:
        LayerSearchError: ``blocks`` is not ``(N, T >= 2)`` integer ids, or ``batch_size < 1``.
    """
    _check_blocks(blocks, batch_size)
    ppl = metrics.perplexity(model, blocks, batch_size)
    return math.inf if math.isnan(ppl) else ppl


@contextmanager
def _swapped_layers(model: nn.Module, prefix: str, blocks: list[nn.Module]) -> Iterator[None]:
    """Temporarily replace the decoder ``nn.ModuleList`` at ``prefix`` with ``blocks``."""
    parent_name, _, child = prefix.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    original = getattr(parent, child)
    # Assigning a Module to an attribute that holds one re-registers it in ``_modules``.
    setattr(parent, child, nn.ModuleList(blocks))
    try:
        yield
    finally:
        setattr(parent, child, original)


def _replace_hidden_states(
    args: tuple[Any, ...], kwargs: dict[str, Any], hidden: torch.Tensor
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    # Llama and GPT-2 pass hidden states as the first positional argument; some
    # architectures pass them by keyword.
    if args:
        return (hidden, *args[1:]), kwargs
    if "hidden_states" in kwargs:
        return args, {**kwargs, "hidden_states": hidden}
    raise LayerSearchError("cannot find the hidden states among a decoder block's arguments")


def _block_output(output: Any) -> torch.Tensor:
    # Transformers 5 blocks return the hidden states; older ones a tuple starting with them.
    return output[0] if isinstance(output, (tuple, list)) else output


class _StopForward(Exception):
    """Raised from a hook to end a forward once the hidden states needed are recorded."""


def _hidden_after_each_block(
    model: nn.Module, prefix: str, layers: list[nn.Module], batch: torch.Tensor
) -> list[torch.Tensor]:
    """Hidden states ``(B, T, H)`` output by ``layers[0 .. k-3]``, run as the whole stack.

    Only these are ever reused (dropping the last block runs the reduced stack whole), so
    the forward stops after ``layers[k-3]``: the last two blocks and the LM head never run.
    """
    need = len(layers) - 2
    if need <= 0:
        return []
    outputs: list[torch.Tensor] = []

    def record(_module: nn.Module, _args: Any, out: Any) -> None:
        outputs.append(_block_output(out))
        if len(outputs) == need:
            raise _StopForward

    handles = [layer.register_forward_hook(record) for layer in layers[:need]]
    try:
        with _swapped_layers(model, prefix, layers):
            model(input_ids=batch.to(next(model.parameters()).device), use_cache=False)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    if len(outputs) != need:
        raise LayerSearchError(
            f"expected {need} decoder block calls before stopping, saw {len(outputs)}"
        )
    return outputs


def _loss_sum_without(
    model: nn.Module,
    prefix: str,
    layers: list[nn.Module],
    drop: int,
    batch: torch.Tensor,
    hidden: list[torch.Tensor] | None,
) -> tuple[float, int]:
    """Summed CE of the stack ``layers`` minus position ``drop``, reusing ``hidden``.

    ``hidden[i]`` is the output of ``layers[i]`` in the full stack; it is exactly the input
    that ``layers[drop + 1]`` receives once ``layers[drop]`` is gone, so only the blocks
    after ``drop`` run. Dropping the first or the last block runs the reduced stack whole
    (the last has no later block to receive the cached state).
    """
    if drop == 0 or drop == len(layers) - 1:
        with _swapped_layers(model, prefix, layers[:drop] + layers[drop + 1 :]):
            return _ranked_loss_sum(model, batch)
    assert hidden is not None
    cached = hidden[drop - 1]
    handle = layers[drop + 1].register_forward_pre_hook(
        lambda _m, args, kwargs: _replace_hidden_states(args, kwargs, cached), with_kwargs=True
    )
    try:
        with _swapped_layers(model, prefix, layers[drop + 1 :]):
            return _ranked_loss_sum(model, batch)
    finally:
        handle.remove()


def _drop_one(
    model: nn.Module,
    prefix: str,
    stack: list[nn.Module],
    kept: list[int],
    batches: list[torch.Tensor],
    last_score: dict[int, float],
    bar: Any,
) -> tuple[float, int]:
    """One greedy step: the (loss sum over all batches, teacher index) of the best removal.

    ``stack`` holds the blocks of ``kept`` (teacher indices, in order). ``last_score`` (mean
    loss sum per batch of each layer's removal at the previous step) orders the candidates
    best first, so that a strong incumbent prunes the rest early; it is updated here.
    """
    hidden: dict[int, list[torch.Tensor]] = {}
    best: tuple[float, int] | None = None
    order = sorted(range(len(kept)), key=lambda p: (last_score.get(kept[p], 0.0), p))
    for pos in order:
        total, done = 0.0, 0
        for b, batch in enumerate(batches):
            done += 1
            if 0 < pos < len(kept) - 1 and b not in hidden:
                hidden[b] = _hidden_after_each_block(model, prefix, stack, batch)
            total += _loss_sum_without(model, prefix, stack, pos, batch, hidden.get(b))[0]
            # Exact pruning: every batch adds a non-negative CE, so once the partial sum is
            # above the best complete one this removal cannot win.
            if best is not None and total > best[0]:
                break
        else:
            # Ties go to the lower index, whatever order candidates ran in.
            if best is None or (total, kept[pos]) < best:
                best = (total, kept[pos])
        last_score[kept[pos]] = total / done  # per batch: pruned ones ran fewer
        bar.update(1)
    assert best is not None
    return best


def greedy_layer_drop(
    model: nn.Module,
    calib_blocks: torch.Tensor,
    target_layers: int,
    *,
    batch_size: int,
    progress: bool = True,
    start: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Drop decoder layers one at a time, each time the one whose removal hurts least.

    Layers interact (a block can matter only because a neighbour is present), so a ranking
    of single-layer removals from the full model is a poor guide once many are gone; greedy
    re-scores every remaining layer after each removal: ``sum(k for k in target_layers+1
    .. L)`` candidates, each running only the layers after the dropped one, the LM head and
    the loss, and most abandoned after their first batch (see the module docstring). The
    result equals that of plain greedy without these savings.

    ``model`` is left as it was: its decoder list is swapped during scoring and restored,
    and its train/eval mode is restored.

    Args:
        model: a causal LM whose decoder blocks :func:`distill.models.decoder_layers` finds
            (llama ``model.layers``, GPT-2 ``transformer.h``, ...).
        calib_blocks: ``(N, T)`` token ids from the train split, ``T >= 2``.
        target_layers: how many layers to keep, ``1 <= target_layers <= L``.
        batch_size: calibration blocks per forward.
        progress: show a tqdm bar over candidate evaluations.
        start: an entry of an earlier trajectory on the same model and blocks to continue
            from (greedy's next step depends only on the layers kept, so continuing gives
            exactly the steps a fresh search would); None starts from every layer.

    Returns:
        The trajectory, one dict per step starting with the full model (or ``start``):
        ``num_layers``, ``layers`` (kept teacher indices, sorted), ``dropped`` (teacher
        index removed at this step, ``None`` at step 0) and ``perplexity`` on
        ``calib_blocks``. The last entry is the selection.

    Raises:
        LayerSearchError: bad ``target_layers``, ``batch_size``, ``calib_blocks`` or ``start``.
        ModelError: the decoder blocks cannot be found.
    """
    _check_blocks(calib_blocks, batch_size)
    prefix, module_list = decoder_layers(model)
    blocks = list(module_list)
    n = len(blocks)
    if start is None:
        ppl = perplexity(model, calib_blocks, batch_size=batch_size)
        start = {"num_layers": n, "layers": list(range(n)), "dropped": None, "perplexity": ppl}
    kept = list(start["layers"])
    if not kept or any(not 0 <= i < n for i in kept):
        raise LayerSearchError(f"start layers {kept} are not layers of a {n}-layer model")
    if not 1 <= target_layers <= len(kept):
        raise LayerSearchError(f"target_layers={target_layers}: must be in 1..{len(kept)}")
    batches = metrics.batches_of(calib_blocks, batch_size)
    count = calib_blocks.shape[0] * (calib_blocks.shape[1] - 1)
    trajectory = [dict(start)]
    bar = tqdm(
        total=sum(range(target_layers + 1, len(kept) + 1)),
        desc="greedy layer drop",
        unit="eval",
        disable=not progress,
    )
    last_score: dict[int, float] = {}
    with metrics.eval_mode(model), torch.inference_mode(), bar:
        while len(kept) > target_layers:
            stack = [blocks[i] for i in kept]
            total, dropped = _drop_one(model, prefix, stack, kept, batches, last_score, bar)
            kept.remove(dropped)
            ppl = metrics.perplexity_from(total, count)
            trajectory.append(
                {
                    "num_layers": len(kept),
                    "layers": list(kept),
                    "dropped": dropped,
                    "perplexity": ppl,
                }
            )
            bar.set_postfix(layers=len(kept), ppl=f"{ppl:.4g}", dropped=dropped)
    return trajectory


def student_perplexities(
    teacher: nn.Module,
    selections: dict[str, list[int]],
    blocks: torch.Tensor,
    *,
    batch_size: int,
) -> dict[str, float]:
    """Perplexity on ``blocks`` of a real student built from each named layer selection.

    Uses :func:`distill.models.build_student_from_teacher`, the construction training
    starts from, so these numbers check the swapped-list scores of the search.
    """
    out: dict[str, float] = {}
    for name, layers in selections.items():
        student = build_student_from_teacher(teacher, layers)  # type: ignore[arg-type]
        out[name] = perplexity(student, blocks, batch_size=batch_size)
        del student
    return out


def format_ranges(layers: list[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0-2,5,7-8"``: a selection readable in one table cell."""
    parts: list[str] = []
    start = prev = None
    for i in sorted(layers):
        if prev is not None and i == prev + 1:
            prev = i
            continue
        if start is not None:
            parts.append(f"{start}-{prev}" if prev != start else f"{start}")
        start = prev = i
    if start is not None:
        parts.append(f"{start}-{prev}" if prev != start else f"{start}")
    return ",".join(parts)
