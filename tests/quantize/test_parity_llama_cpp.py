"""The quantize stage checks every GGUF file in llama.cpp, the runtime it is written for."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from distill.config import (
    EvalConfig,
    PairConfig,
    PipelineConfig,
    QuantConfig,
    StudentConfig,
    TeacherConfig,
)
from distill.data import PackedSplits
from distill.names import GGUF_TYPES, LLAMA_QUANT_TYPES
from distill.quantize import parity
from distill.quantize.parity import ParityError
from distill.quantize.stage import run
from distill.run_dir import gguf_key
from tests.conftest import make_tokenizer, tiny_llama

VOCAB = 300  # make_tokenizer(300) has merges, which llama.cpp's BPE vocabulary requires
VAL = torch.arange(64).reshape(4, 16) * 5 % VOCAB


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("llama") / "final"
    tiny_llama(VOCAB, layers=2, seed=3).save_pretrained(str(folder))
    make_tokenizer(VOCAB).save_pretrained(str(folder))
    return folder


def _cfg(gguf: list[str]) -> PipelineConfig:
    return PipelineConfig(
        pair=PairConfig(
            name="tiny",
            teacher=TeacherConfig(name_or_path="unused"),
            student=StudentConfig(num_layers=1),
        ),
        quant=QuantConfig(methods=[], gguf=gguf, calibration="none"),
        eval=EvalConfig(teacher_gguf=False),  # the teacher's file: tests/evaluate/test_llama_cpp
    )


SPLITS = PackedSplits(train=VAL, val=VAL)


def _run_dir(src: Path, tmp_path: Path) -> Path:
    shutil.copytree(src, tmp_path / "run" / "final")
    return tmp_path / "run"


def _records(run_dir: Path) -> dict[str, dict]:
    records = json.loads((run_dir / "quantized" / "quantize.json").read_text())
    return {r["method"]: r for r in records}


def _failed_records(run_dir: Path, message: str) -> dict[str, dict]:
    """After a failed check quantized/ is not there; the records wait in the staging folder
    the message names."""
    assert not (run_dir / "quantized").exists()
    (staging,) = run_dir.glob(".staging-quantized-*")
    assert str(staging) in message
    records = json.loads((staging / "quantize.json").read_text())
    return {r["method"]: r for r in records}


def test_every_gguf_type_has_measured_limits() -> None:
    types = (*GGUF_TYPES, *LLAMA_QUANT_TYPES)
    assert set(parity.LLAMA_CPP_LIMITS) == {gguf_key(t) for t in types}
    assert {gguf_key(t) for t in types} <= set(parity.MAX_KL_TO_FLOAT)


def test_llama_made_types_are_checked_like_ours(src: Path, tmp_path: Path) -> None:
    # llama.cpp's quantizer writes q4_k_m from our F16 file (read from the staging folder,
    # then removed), weighed by the importance matrix of the calibration blocks.
    run_dir = _run_dir(src, tmp_path)
    run(_cfg(["q4_k_m", "q8_0"]), run_dir, splits=SPLITS)
    record = _records(run_dir)["gguf-q4_k_m"]
    assert record["made_by"].startswith("llama.cpp's quantizer") and record["imatrix"] is True
    assert record["parity"]["passed"] is True, record["parity"]
    # 32-wide rows are not whole 256-value k-quant blocks: every matrix fell back per tensor.
    assert "q4_k" not in record["tensor_types"] and record["tensor_types"]["q5_0"] > 0
    assert (run_dir / "quantized" / "gguf" / "student-q4_k_m.gguf").is_file()
    assert sorted(p.name for p in (run_dir / "quantized" / "gguf").iterdir()) == [
        "student-q4_k_m.gguf",
        "student-q8_0.gguf",
    ]


def test_gguf_files_pass_in_llama_cpp_within_their_limits(src: Path, tmp_path: Path) -> None:
    run_dir = _run_dir(src, tmp_path)
    run(_cfg(["f16", "q8_0"]), run_dir, splits=SPLITS)
    records = _records(run_dir)
    for method in ("gguf-f16", "gguf-q8_0"):
        par = records[method]["parity"]
        assert par["passed"] is True and par["checked_in"].startswith("llama.cpp 0.3.36"), par
        assert par["thresholds"] == {
            **parity.LLAMA_CPP_LIMITS[method],
            "kl_to_float": parity.MAX_KL_TO_FLOAT[method],
        }
        assert par["tokenizer_ids_match"] is True
        assert par["scored_positions"] == 2 * 15 and par["top1_to_in_memory"] > 0.9
    # F16 in llama.cpp is the in-memory model up to fp16 activations (measured ~2e-4).
    assert records["gguf-f16"]["parity"]["max_abs_logit_diff"] < 2e-3
    assert records["gguf-f16"]["parity"]["kl_to_in_memory"] < 1e-5


def _scale_output_norm(path: Path, factor: float) -> None:
    """Multiply the F32 ``output_norm.weight`` of a GGUF file in place (a wrong scale)."""
    from gguf import GGUFReader

    tensor = next(t for t in GGUFReader(str(path), "r+").tensors if t.name == "output_norm.weight")
    tensor.data[...] = tensor.data * factor
    tensor.data.flush()


def test_a_file_past_its_limits_fails_the_stage_naming_it(
    src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import distill.quantize.gguf as gguf_module

    real_export = gguf_module.export_gguf

    def export_then_corrupt(model, tokenizer, path, gguf_type, **kwargs):
        export = real_export(model, tokenizer, path, gguf_type, **kwargs)
        if gguf_type == "q8_0":
            _scale_output_norm(export.path, 30.0)
        return export

    monkeypatch.setattr(gguf_module, "export_gguf", export_then_corrupt)
    run_dir = _run_dir(src, tmp_path)
    with pytest.raises(ParityError) as err:
        run(_cfg(["f16", "q8_0"]), run_dir, splits=SPLITS)
    message = str(err.value)
    assert "/gguf/student-q8_0.gguf: max |logit - in-memory logit|" in message
    assert "KL to the in-memory model" in message and "student-f16.gguf" not in message
    records = _failed_records(run_dir, message)  # written whatever the verdict
    assert records["gguf-f16"]["parity"]["passed"] is True
    assert records["gguf-q8_0"]["parity"]["passed"] is False


def test_a_file_llama_cpp_refuses_fails_with_its_reason(
    src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import distill.quantize.gguf as gguf_module

    real_export = gguf_module.export_gguf

    def export_then_truncate(model, tokenizer, path, gguf_type, **kwargs):
        export = real_export(model, tokenizer, path, gguf_type, **kwargs)
        export.path.write_bytes(export.path.read_bytes()[:4096])
        return export

    monkeypatch.setattr(gguf_module, "export_gguf", export_then_truncate)
    run_dir = _run_dir(src, tmp_path)
    with pytest.raises(ParityError, match="student-q8_0.gguf: llama.cpp could not load") as err:
        run(_cfg(["q8_0"]), run_dir, splits=SPLITS)
    par = _failed_records(run_dir, str(err.value))["gguf-q8_0"]["parity"]
    assert par["passed"] is False and "failed to read" in par["error"]


def test_without_llama_cpp_gguf_parity_is_not_checked_and_the_stage_goes_on(
    src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp raises ImportError
    run_dir = _run_dir(src, tmp_path)
    records = run(_cfg(["q8_0"]), run_dir, splits=SPLITS)
    par = records[0]["parity"]
    assert par["passed"] is None and par["checked_in"] is None
    assert par["not_checked"].startswith("not checked: llama-cpp-python is not importable")
    assert "pip install llama-cpp-python==0.3.36" in par["not_checked"]
    assert (run_dir / "quantized" / "gguf" / "student-q8_0.gguf").is_file()
