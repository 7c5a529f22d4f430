"""Quantization-aware distillation (QAD): the last ``train.qad_steps`` steps see the student's
linear weights as the GGUF file will store them.

The loss is the run's own divergence to the teacher; only the forward changes. Each linear
weight (not the embedding, nor a head tied to it: the 4-bit files keep those at 8 bits) is
rounded onto ``train.qad``'s grid in the forward, and the gradient passes the rounding as if
it were not there (straight-through): the latent float weights keep learning, pulled towards
values that survive the rounding. The quantize stage then writes the file by plain rounding of
those weights onto the same grid (no GPTQ for that type: it would move them off it).

Grids, each as ggml defines the block (32 values along a row, one scale per block):

* ``q4_0``: scale = the block's value of largest magnitude / -8, levels 0..15 around 8;
* ``q8_0``: scale = the block's largest magnitude / 127, levels -127..127.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.utils import parametrize

BLOCK = 32


def q4_0_grid(w: torch.Tensor) -> torch.Tensor:
    """``w`` rounded onto GGUF Q4_0 blocks (rows of a multiple of 32 values)."""
    x = w.reshape(-1, BLOCK)
    peak = x.gather(1, x.abs().argmax(1, keepdim=True))  # signed: Q4_0 maps it to level 0
    scale = peak / -8
    inv = torch.where(scale != 0, 1 / scale, torch.zeros_like(scale))
    levels = torch.clamp(torch.floor(x * inv + 8.5), 0, 15)
    return ((levels - 8) * _as_stored(scale)).reshape(w.shape)


def q8_0_grid(w: torch.Tensor) -> torch.Tensor:
    """``w`` rounded onto GGUF Q8_0 blocks (rows of a multiple of 32 values)."""
    x = w.reshape(-1, BLOCK)
    scale = x.abs().amax(1, keepdim=True) / 127
    inv = torch.where(scale != 0, 1 / scale, torch.zeros_like(scale))
    v = x * inv
    levels = torch.sign(v) * torch.floor(v.abs() + 0.5)  # C's roundf: halves away from 0
    return (levels * _as_stored(scale)).reshape(w.shape)


def _as_stored(scale: torch.Tensor) -> torch.Tensor:
    """A block scale as the file keeps it: fp16 (levels are chosen with the fp32 scale)."""
    return scale.to(torch.float16).to(scale.dtype)


GRIDS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"q4_0": q4_0_grid, "q8_0": q8_0_grid}


class _StraightThrough(nn.Module):
    def __init__(self, grid: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.grid = grid

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + (self.grid(w.detach()) - w).detach()


def qad_modules(model: nn.Module) -> list[nn.Linear]:
    """The linear layers QAD rounds: every ``nn.Linear`` whose rows are whole blocks, except a
    head that shares the input embedding's weight."""
    embedding = model.get_input_embeddings().weight
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.Linear) and m.weight is not embedding and m.in_features % BLOCK == 0
    ]


@contextmanager
def fake_quantized(model: nn.Module, grid: str | None) -> Iterator[None]:
    """Inside the block, ``model``'s QAD layers compute with their weights on ``grid`` (a
    :data:`GRIDS` name; None: unchanged), gradients straight through to the float weights,
    which stay the same Parameter objects (the optimizer keeps updating them)."""
    if grid is None:
        yield
        return
    modules = qad_modules(model)
    for m in modules:
        parametrize.register_parametrization(m, "weight", _StraightThrough(GRIDS[grid]))
    try:
        yield
    finally:
        for m in modules:
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)


def grid_at(qad: str | None, qad_steps: int, max_steps: int, step: int) -> str | None:
    """The grid step ``step`` (0-based) trains through: ``qad`` in the last ``qad_steps``."""
    return qad if qad is not None and step >= max_steps - qad_steps else None
