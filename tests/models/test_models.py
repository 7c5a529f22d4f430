"""Layer selection for llama and GPT-2 layouts, the vocab check, and weight-loading safety."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distill.models.load import (
    ModelError,
    VocabMismatchError,
    check_source,
    check_vocab,
    load_causal_lm,
)
from distill.models.student import (
    build_student_from_config,
    build_student_from_teacher,
    decoder_layers,
)
from tests.conftest import make_tokenizer, tiny_gpt2, tiny_llama


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_student_copies_chosen_layers(make) -> None:
    teacher = make(128, layers=4)
    student = build_student_from_teacher(teacher, [0, 3])
    _, t_layers = decoder_layers(teacher)
    _, s_layers = decoder_layers(student)
    assert len(s_layers) == 2 and student.config.num_hidden_layers == 2
    for s_idx, t_idx in enumerate([0, 3]):
        t_state = t_layers[t_idx].state_dict()
        for key, value in s_layers[s_idx].state_dict().items():
            assert torch.equal(value, t_state[key]), key
    # Everything outside the blocks (embeddings, final norm, head) is copied too.
    ids = torch.randint(0, 128, (1, 6))
    with torch.no_grad():
        full = build_student_from_teacher(teacher, [0, 1, 2, 3])(ids).logits
        assert torch.allclose(full, teacher(ids).logits, atol=1e-5)


def test_student_keeps_tied_embeddings_tied() -> None:
    student = build_student_from_teacher(tiny_llama(64, layers=3), [1])
    assert student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()


def test_student_kv_cache_generation_works() -> None:
    student = build_student_from_teacher(tiny_llama(64, layers=4), [0, 2])
    out = student.generate(
        torch.tensor([[1, 2, 3]]), max_new_tokens=4, min_new_tokens=4, do_sample=False
    )
    assert out.shape == (1, 7)


def test_layer_indices_validated() -> None:
    with pytest.raises(ModelError, match=r"\[7\]"):
        build_student_from_teacher(tiny_llama(64, layers=4), [0, 7])


def test_from_config_overrides_and_unknown_key() -> None:
    teacher = tiny_llama(64, layers=4)
    student = build_student_from_config(
        teacher.config, {"num_hidden_layers": 1, "intermediate_size": 16}
    )
    assert student.config.num_hidden_layers == 1 and student.config.intermediate_size == 16
    with pytest.raises(ModelError, match="not_a_key"):
        build_student_from_config(teacher.config, {"not_a_key": 1})


def test_vocab_check_names_both_sizes() -> None:
    tok = make_tokenizer(200)
    check_vocab(tok, tok, len(tok), len(tok))
    with pytest.raises(VocabMismatchError, match=f"{len(tok) + 5}.*{len(tok)}"):
        check_vocab(tok, tok, len(tok), len(tok) + 5)
    renamed = make_tokenizer(200, eos="<eos>")  # same size, one string differs
    assert len(renamed) == len(tok)
    with pytest.raises(VocabMismatchError, match="differ at id 0"):
        check_vocab(tok, renamed, len(tok), len(tok))
    bigger = make_tokenizer(200)
    bigger.add_tokens(["<extra>"])
    with pytest.raises(VocabMismatchError, match=f"{len(tok) + 1}.*{len(tok)}"):
        check_vocab(tok, bigger, len(tok), len(tok))


def test_missing_paths_fail_before_loading(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        check_source(str(tmp_path / "nope"), "pair.teacher.name_or_path")
    with pytest.raises(ModelError, match="not installed"):
        check_source("pkg:surely-not-a-real-distribution", "pair.teacher.name_or_path", "x.gguf")
    check_source("HuggingFaceTB/SmolLM2-135M", "teacher")  # a Hub id is accepted unresolved


def test_pickled_only_folder_is_refused_without_unpickling(tmp_path: Path) -> None:
    model = tiny_llama(64)
    model.config.save_pretrained(str(tmp_path))
    marker = tmp_path / "side_effect"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"x": Evil()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelError, match="pickled"):
        load_causal_lm(str(tmp_path), what="student")
    assert not marker.exists()


CUSTOM_MODEL = """
from pathlib import Path

from transformers import LlamaForCausalLM

Path({marker!r}).touch()  # the side effect that shows this module ran


class CustomModel(LlamaForCausalLM):
    pass
"""


def test_remote_code_is_opt_in(tmp_path: Path) -> None:
    import json

    folder = tmp_path / "model"
    tiny_llama(64).save_pretrained(str(folder))
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "custom_model.CustomModel"}
    (folder / "config.json").write_text(json.dumps(cfg))
    marker = tmp_path / "custom_code_ran"
    (folder / "custom_model.py").write_text(CUSTOM_MODEL.format(marker=str(marker)))

    # Off (the default): the folder's own modeling file is never imported; the built-in
    # class reads the weights.
    refused = load_causal_lm(str(folder), what="student")
    assert type(refused).__name__ == "LlamaForCausalLM"
    assert not marker.exists()
    # On: the custom class is what loads, offline, from the local folder.
    trusted = load_causal_lm(str(folder), what="student", trust_remote_code=True)
    assert type(trusted).__name__ == "CustomModel"
    assert marker.exists()
