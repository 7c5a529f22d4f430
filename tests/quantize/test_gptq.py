"""GPTQ int4 groups: the grid, the error feedback, and byte-exact Q4_0 packing."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from torch import nn

from distill.quantize.gptq import (
    Int4Groups,
    collect_hessians,
    gptq_int4,
    group_scales,
    pack_q4_0,
    rtn_int4,
)


def _weight(rows: int = 16, cols: int = 96, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def test_rtn_puts_each_groups_largest_magnitude_on_level_minus_8() -> None:
    w = _weight()
    g = rtn_int4(w, 32)
    assert g.levels.dtype == torch.int8 and g.scales.dtype == torch.float16
    assert int(g.levels.min()) >= -8 and int(g.levels.max()) <= 7
    groups = w.reshape(16, 3, 32)
    at_max = groups.abs().argmax(-1)
    levels = g.levels.reshape(16, 3, 32)
    assert (torch.gather(levels, -1, at_max.unsqueeze(-1)) == -8).all()
    # Within half a step of its level, except at the clamped end: the grid is [-8, 7], so a
    # value of magnitude near the maximum on the other side rounds to 8 and is held at 7.
    step = g.scales.float().repeat_interleave(32, dim=1).abs()
    err = (g.dequantize() - w).abs()
    assert (err <= step * 1.01).all()
    inside = (w / g.scales.float().repeat_interleave(32, dim=1)) < 7.5  # not past level 7
    assert (err[inside] <= 0.5 * step[inside] * 1.01 + 1e-6).all()


def test_pack_q4_0_matches_the_gguf_packages_own_writer() -> None:
    w = _weight(8, 128, seed=3)
    ours = pack_q4_0(rtn_int4(w, 32))
    theirs = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q4_0)
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    assert np.array_equal(ours, theirs)
    back = gguf.quants.dequantize(ours, gguf.GGMLQuantizationType.Q4_0)
    np.testing.assert_array_equal(back, rtn_int4(w, 32).dequantize().numpy())


def test_gptq_with_uncorrelated_inputs_is_plain_rounding() -> None:
    # H = c * I: no column can absorb another's error, so GPTQ reduces to RTN exactly.
    w = _weight()
    g = gptq_int4(w, 3.0 * torch.eye(96), 32, damp=0.0, act_order=False)
    r = rtn_int4(w, 32)
    assert torch.equal(g.levels, r.levels) and torch.equal(g.scales, r.scales)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_lowers_output_error_on_correlated_inputs(act_order: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    mix = torch.randn(96, 96, generator=gen) / 96**0.5
    x = torch.randn(512, 96, generator=gen) @ (torch.eye(96) + 2 * mix)  # correlated features
    w = _weight()
    h = 2 * x.T @ x / x.shape[0]
    g = gptq_int4(w, h, 32, act_order=act_order)
    r = rtn_int4(w, 32)
    assert torch.equal(g.scales, group_scales(w, 32))  # static groups: same scales as RTN
    out_err = lambda q: ((x @ (q.dequantize() - w).T) ** 2).mean().item()  # noqa: E731
    assert out_err(g) < 0.8 * out_err(r), (out_err(g), out_err(r))


def test_dead_inputs_are_zeroed_not_nan() -> None:
    w = _weight()
    x = torch.randn(256, 96)
    x[:, 5] = 0.0
    g = gptq_int4(w, 2 * x.T @ x / 256, 32)
    assert torch.isfinite(g.dequantize()).all()
    assert int(g.levels[:, 5].abs().max()) == 0


def test_collect_hessians_is_2xtx_over_n() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(8, 4, bias=False)

    class Wrap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.proj = lin

        def forward(self, input_ids: torch.Tensor, use_cache: bool = False) -> torch.Tensor:
            return self.proj(self.emb(input_ids))

    model = Wrap()
    ids = torch.randint(0, 10, (3, 5))
    h = collect_hessians(model, ids, ["proj"], batch_size=2)["proj"]
    x = model.emb(ids).reshape(-1, 8).detach()
    torch.testing.assert_close(h, 2 * x.T @ x / 15)


def test_int4_groups_reject_partial_groups() -> None:
    with pytest.raises(ValueError, match="whole groups of 32"):
        group_scales(torch.zeros(4, 48), 32)
    with pytest.raises(ValueError, match="32 values"):
        pack_q4_0(Int4Groups(torch.zeros(2, 64, dtype=torch.int8), torch.ones(2, 1).half()))
