"""Quantization-aware distillation (distill/train/qad.py)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from distill.train.qad import fake_quantized, grid_at, q4_0_grid, q8_0_grid, qad_modules
from tests.conftest import tiny_llama


@pytest.mark.parametrize(
    "grid,kind",
    [(q4_0_grid, gguf.GGMLQuantizationType.Q4_0), (q8_0_grid, gguf.GGMLQuantizationType.Q8_0)],
)
def test_grids_round_exactly_as_the_gguf_files_store(grid, kind) -> None:
    torch.manual_seed(0)
    w = torch.randn(48, 96) * 0.05
    w[3, :32] = 0.0  # an all-zero block stays zero
    stored = gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), kind), kind)
    np.testing.assert_array_equal(grid(w).numpy(), stored)


def test_fake_quantized_forward_uses_the_grid_and_trains_the_float_weights() -> None:
    import copy

    model = tiny_llama(64, seed=1, tie=True)
    ids = torch.arange(16).reshape(2, 8)
    layers = qad_modules(model)
    assert layers and all(m.weight is not model.get_input_embeddings().weight for m in layers)
    rounded = copy.deepcopy(model)  # the weights as the Q4_0 file would store them
    with torch.no_grad():
        for m in qad_modules(rounded):
            m.weight.copy_(q4_0_grid(m.weight))
        plain = model(input_ids=ids).logits
    want = rounded(input_ids=ids).logits
    want.sum().backward()
    params = [m.weight for m in layers]
    with fake_quantized(model, "q4_0"):
        got = model(input_ids=ids).logits
        got.sum().backward()
    torch.testing.assert_close(got, want.detach())
    assert not torch.allclose(got, plain)
    # Straight through: each float weight gets the gradient its rounded value would get.
    for m, r in zip(layers, qad_modules(rounded), strict=True):
        torch.testing.assert_close(m.weight.grad, r.weight.grad)
    # The parametrization is gone, the same Parameters hold their float values and gradients.
    assert all(m.weight is p for m, p in zip(qad_modules(model), params, strict=True))
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, plain)


def test_only_the_last_steps_train_through_the_grid() -> None:
    assert [grid_at("q4_0", 2, 5, s) for s in range(5)] == [None, None, None, "q4_0", "q4_0"]
    assert grid_at(None, 0, 5, 4) is None


def test_a_student_trained_through_q4_0_is_written_without_gptq() -> None:
    from distill.config import PairConfig, PipelineConfig, StudentConfig, TeacherConfig, TrainConfig
    from distill.quantize.stage import calibration_group_sizes

    pair = PairConfig(
        name="t", teacher=TeacherConfig(name_or_path="x"), student=StudentConfig(num_layers=1)
    )
    plain = PipelineConfig(pair=pair)
    qad = PipelineConfig(pair=pair, train=TrainConfig(qad="q4_0", qad_steps=1))
    assert calibration_group_sizes(plain, [], ["q8_0", "q4_0"]) == {32}
    assert calibration_group_sizes(qad, [], ["q8_0", "q4_0"]) == set()
