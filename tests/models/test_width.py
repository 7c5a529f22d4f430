"""Width pruning (distill/models/width.py): a cut that keeps everything is the teacher, the
importance ranking finds units built to be the least important, and a cut student is a
standard model that reloads as it was saved."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from distill.config import StudentConfig
from distill.models import ModelError, Width, build_student, planned_config, prune_width
from distill.models.width import KEPT_CHANNELS_ATTR, head_layout, measure_importance, top_indices
from tests.quantize.gguf_models import arch_model, perturb_vectors

VOCAB = 97
BLOCKS = (torch.arange(4 * 24).reshape(4, 24) * 31) % VOCAB


def tiny_gemma3(layers: int = 4):
    """A hidden-64 Gemma 3 text model whose layers alternate sliding and full attention."""
    from transformers import Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"] * (layers // 2),
        max_position_embeddings=64,
        initializer_range=0.1,
    )
    return perturb_vectors(AutoModelForCausalLM.from_config(config).eval())


def model_of(arch: str):
    if arch == "gemma3":
        return tiny_gemma3()
    return arch_model(arch, VOCAB, tie=arch != "llama3")


def logits(model, ids: torch.Tensor = BLOCKS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("arch", ["llama3", "qwen2", "qwen3", "gemma2", "gemma3"])
def test_a_cut_that_keeps_everything_reproduces_the_teacher_exactly(arch: str) -> None:
    teacher = model_of(arch)
    _, n_kv, _ = head_layout(teacher.config)
    full = Width(int(teacher.config.intermediate_size), n_kv, int(teacher.config.hidden_size))
    student = prune_width(teacher, full, BLOCKS)
    assert student is not teacher
    assert torch.equal(logits(student), logits(teacher))


def test_the_ranking_keeps_index_order_and_breaks_ties_low() -> None:
    assert top_indices(torch.tensor([0.5, 3.0, 1.0, 3.0, 2.0]), 3) == [1, 3, 4]
    assert top_indices(torch.tensor([1.0, 1.0, 1.0]), 2) == [0, 1]


def silenced_llama():
    """A 2-layer llama in which the least important units are known: MLP channels whose gate
    rows are zero (silu(0) = 0, nothing reaches down_proj), a key/value group whose value rows
    are zero (its heads output nothing), and hidden channels whose every norm weight is zero
    (no normalised input carries them)."""
    model = arch_model("llama3", VOCAB, tie=False, layers=2)
    silent_mlp = {0: [3, 70, 127], 1: [0, 64, 100]}
    silent_group = {0: 1, 1: 0}
    silent_hidden = [5, 40, 63]
    head_dim = head_layout(model.config)[2]
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            layer.mlp.gate_proj.weight[silent_mlp[i]] = 0.0
            g = silent_group[i]
            layer.self_attn.v_proj.weight[g * head_dim : (g + 1) * head_dim] = 0.0
            layer.input_layernorm.weight[silent_hidden] = 0.0
            layer.post_attention_layernorm.weight[silent_hidden] = 0.0
        model.model.norm.weight[silent_hidden] = 0.0
    return model, silent_mlp, silent_group, silent_hidden


def test_the_units_built_to_be_silent_are_the_ones_cut() -> None:
    model, silent_mlp, silent_group, silent_hidden = silenced_llama()
    importance = measure_importance(model, BLOCKS, batch_size=2)
    for i in (0, 1):
        assert all(float(importance.mlp[i][j]) == 0.0 for j in silent_mlp[i])
        assert float(importance.kv_groups[i][silent_group[i]]) == 0.0
    assert all(float(importance.hidden[c]) == 0.0 for c in silent_hidden)

    student = prune_width(model, Width(128 - 3, 1, 64 - 3), BLOCKS, batch_size=2)
    kept = getattr(student.config, KEPT_CHANNELS_ATTR)
    for i in (0, 1):
        assert kept["intermediate"][i] == [j for j in range(128) if j not in silent_mlp[i]]
        assert kept["kv_groups"][i] == [1 - silent_group[i]]
    assert kept["hidden"] == [c for c in range(64) if c not in silent_hidden]
    # Nothing that was cut carried anything except the hidden channels, whose removal changes
    # each RMSNorm's mean: so the MLP and attention cuts alone are exact.
    exact = prune_width(model, Width(128 - 3, 1, None), BLOCKS, batch_size=2)
    assert torch.allclose(logits(exact), logits(model), atol=1e-5)
    assert student.config.num_attention_heads == 2 and student.config.num_key_value_heads == 1
    assert student.config.head_dim == 16 and student.config.hidden_size == 61


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "gemma2", "gemma3"])
def test_a_cut_student_reloads_as_it_was_saved(arch: str, tmp_path: Path) -> None:
    teacher = model_of(arch)
    # qwen2's config derives head_dim from hidden / heads unless it is written out.
    student = prune_width(teacher, Width(96, 1, 48), BLOCKS)
    student.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(logits(again), logits(student))
    assert again.config.intermediate_size == 96 and again.config.hidden_size == 48
    assert (
        getattr(again.config, KEPT_CHANNELS_ATTR)["hidden"]
        == getattr(student.config, KEPT_CHANNELS_ATTR)["hidden"]
    )
    if arch.startswith("gemma"):  # the sliding/full pattern of the kept layers is kept
        assert again.config.layer_types == teacher.config.layer_types


def test_depth_and_width_cut_together_and_the_planned_config_agrees() -> None:
    teacher = model_of("gemma3")
    cfg = StudentConfig(layers=[0, 3], intermediate_size=64, num_key_value_heads=1)
    student, _ = build_student(cfg, teacher, 0, train_blocks=BLOCKS)
    assert student.config.num_hidden_layers == 2
    assert student.config.layer_types == ["sliding_attention", "full_attention"]
    planned = planned_config(cfg, teacher.config)
    for key in ("num_hidden_layers", "intermediate_size", "num_key_value_heads", "hidden_size"):
        assert getattr(planned, key) == getattr(student.config, key), key
    assert logits(student).shape == (4, 24, VOCAB)


def test_widths_beyond_the_teacher_and_gpt2_are_named_before_any_work() -> None:
    teacher = arch_model("qwen2", VOCAB)
    cfg = StudentConfig(layers=[0], intermediate_size=129, num_key_value_heads=3)
    with pytest.raises(ModelError) as err:
        planned_config(cfg, teacher.config)
    assert "pair.student.intermediate_size=129: the teacher has 128" in str(err.value)
    assert "pair.student.num_key_value_heads=3: the teacher has 2" in str(err.value)
    with pytest.raises(ModelError, match="not gpt2"):
        build_student(StudentConfig(layers=[0], hidden_size=32), arch_model("gpt2", VOCAB), 0)


def test_the_schema_names_bad_widths() -> None:
    problems = StudentConfig(layers=[0], intermediate_size=0, width_calibration_blocks=0).problems()
    assert "pair.student.intermediate_size=0: must be >= 1" in problems
    assert "pair.student.width_calibration_blocks=0: must be >= 1" in problems
    problems = StudentConfig(init="from_config", hidden_size=32).problems()
    assert any("config_overrides.hidden_size instead" in p for p in problems)
