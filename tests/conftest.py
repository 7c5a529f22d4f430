"""Shared fixtures: microscopic models and a tokenizer built in-process, no network."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
CORPUS = (
    "The quick brown fox jumps over the lazy dog. A distilled student learns from its teacher. "
    "Memory traffic bounds decoding: every generated token reads every weight once. "
) * 4


def make_tokenizer(vocab_size: int = 200, eos: str = "<|endoftext|>"):
    """A byte-level BPE tokenizer trained on a few sentences (a second or less)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[eos],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=eos)


def tiny_tokenizer():
    """A word-level tokenizer of 130 tokens: ``w0`` .. ``w127``, ``<unk>``, ``<eos>``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(128)} | {"<unk>": 128, "<eos>": 129}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>"
    )


WORD_VOCAB = 130  # tiny_tokenizer's 128 words + <unk> + <eos>
# The fields every report row carries (report.json, read by the frontier and the card).
REPORT_FIELDS = frozenset(
    {
        "name",
        "params",
        "weight_bytes",
        "disk_bytes",
        "peak_memory_bytes",
        "perplexity",
        "kl_to_teacher",
        "top1_agreement",
        "prefill_tokens_per_s",
        "decode_tokens_per_s",
    }
)


def word_llama(seed: int, num_layers: int = 2):
    """A tiny tied llama over :func:`tiny_tokenizer`'s vocabulary (<eos> = 129)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=WORD_VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        bos_token_id=129,
        eos_token_id=129,
        pad_token_id=129,
    )
    return LlamaForCausalLM(config).eval()


def tiny_llama(vocab_size: int, layers: int = 2, seed: int = 0, tie: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(vocab_size: int, layers: int = 2, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=layers, n_head=4, n_positions=256)
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="session")
def tokenizer():
    # 300 > the 257 byte-alphabet + special tokens, so it learns merges: llama.cpp refuses a
    # BPE vocabulary without a merges list, and the GGUF files of the tiny runs must load there.
    return make_tokenizer(vocab_size=300)


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory, tokenizer) -> Path:
    """A 4-layer llama teacher with its tokenizer, saved as a local HF folder."""
    folder = tmp_path_factory.mktemp("tiny_teacher")
    model = tiny_llama(len(tokenizer), layers=4)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def tiny_corpus_dir(tmp_path_factory) -> Path:
    """A few text files, enough for a handful of 16-token blocks in each split."""
    folder = tmp_path_factory.mktemp("corpus")
    for i in range(6):
        (folder / f"doc{i}.txt").write_text(f"Document {i}. " + CORPUS)
    return folder


# The stages tests/kill_runner.py kills a pipeline inside, in order ("none": left to finish).
KILL_STAGES = ("train", "quantize", "evaluate", "publish", "none")


def _hidden(run_dir: Path) -> list[str]:
    """Hidden entries of the run dir but Hydra's own record of the first run (.hydra)."""
    return sorted(
        p.name for p in run_dir.iterdir() if p.name.startswith(".") and p.name != ".hydra"
    )


@pytest.fixture(scope="session")
def resume_chain(tmp_path_factory, tiny_teacher_dir: Path, tiny_corpus_dir: Path) -> dict:
    """One tiny pipeline run dir taken through every stage by a chain of processes, each
    killed with SIGKILL inside the next stage (tests/kill_runner.py) and the next one
    rerunning it with ``run_dir=``; the last one finishes. Per stage: the process's exit
    code, stdout, stderr and log, and what the run dir held after it. Shared by the resume
    tests and the tiny end-to-end test (one pipeline's worth of runs instead of two)."""
    root = tmp_path_factory.mktemp("resume")
    run_dir = root / "run"
    first = [
        *tiny_overrides(tiny_teacher_dir, tiny_corpus_dir, root / "cache"),
        "quant.gguf=[q8_0]",  # one file of each kind is enough here
        f"hydra.run.dir={run_dir}",
    ]
    # An empty matplotlib cache, as on a fresh machine: building its font list must not be
    # announced in the run's log.
    env = {**os.environ, "PYTHONPATH": str(REPO), "MPLCONFIGDIR": str(root / "matplotlib")}
    out: dict = {}
    for i, stage in enumerate(KILL_STAGES):
        args = first if i == 0 else [f"run_dir={run_dir}", f"hydra.run.dir={root}/rerun{i}"]
        proc = subprocess.run(
            [sys.executable, str(REPO / "tests" / "kill_runner.py"), stage, *args],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=600,
            env=env,
        )
        log_dir = run_dir if i == 0 else root / f"rerun{i}"
        out[stage] = {
            "returncode": proc.returncode,
            "stdout": proc.stdout,
            "stderr": proc.stderr,
            "log": (log_dir / "pipeline.log").read_text(),
            "entries": sorted(p.name for p in run_dir.iterdir()),
            "hidden": _hidden(run_dir),
            "checkpoints": sorted(p.name for p in (run_dir / "checkpoints").glob("step-*")),
        }
    out["run_dir"] = run_dir
    return out


def compose(overrides: list[str]):
    """The real shipped config, composed as a script would, with ``overrides`` (a student
    shape among them replacing the pair file's, as on the command line)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from distill.cli import depth_from_command_line  # also registers the schema

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = hydra_compose(config_name="pipeline", overrides=overrides)
    return depth_from_command_line(cfg, overrides)


def tiny_overrides(teacher_dir: Path, corpus_dir: Path, cache_dir: Path) -> list[str]:
    """Overrides that shrink the default pipeline to seconds on the tiny teacher."""
    return [
        f"pair.teacher.name_or_path={teacher_dir}",
        "pair.teacher.gguf_file=null",
        "pair.student.layers=[0,3]",
        "data=text_files",
        f"data.paths=[{corpus_dir}/*.txt]",
        "data.block_size=16",
        "data.val_fraction=0.34",
        "train.max_steps=4",
        "train.batch_size=2",
        "train.eval_every_n_steps=2",
        "train.save_every_n_steps=2",
        "train.eval_max_blocks=2",
        "train.warmup_steps=1",
        "eval.max_blocks=2",
        "eval.prompt_tokens=4",
        "eval.decode_tokens=4",
        "eval.prefill_tokens=8",
        "eval.repeats=1",
        # Compiling takes tens of seconds: test_compiled_decode covers it on its own.
        "eval.compiled_decode=[]",
        # Small fidelity sets (tests/evaluate/test_fidelity.py covers them).
        "eval.teacher_text_prompts=3",
        "eval.teacher_text_tokens=6",
        "eval.generation_prompts=2",
        "eval.generation_tokens=6",
        "eval.fidelity_prompt_tokens=6",
        "eval.draft_tokens=8",
        # The default's Q4_K_M is llama.cpp's own quantizer (tests/quantize/test_llama_quant.py).
        "quant.gguf=[q8_0,q4_0]",
        f"cache_dir={cache_dir}",
    ]


@pytest.fixture(autouse=True)
def _no_env_cache(monkeypatch):
    # Tests pass cache_dir explicitly; an outer DISTILL_CACHE must not redirect them.
    monkeypatch.delenv("DISTILL_CACHE", raising=False)


# Where Hydra puts a script's run dir when a test forgets hydra.run.dir / hydra.sweep.dir.
HYDRA_DEFAULT_DIRS = ("outputs", "multirun")


def _hydra_dirs_in_checkout() -> set[Path]:
    found = set()
    for name in HYDRA_DEFAULT_DIRS:
        root = REPO / name
        if root.exists():
            found.add(root)
            found.update(root.glob("*/*"))  # <date>/<time>, as configs/pipeline.yaml names them
    return found


@pytest.fixture(autouse=True)
def _no_run_dirs_in_checkout():
    """Fail the test that leaves outputs/ or multirun/ in the checkout: every script a test
    runs must be given hydra.run.dir (or hydra.sweep.dir) under tmp_path."""
    before = _hydra_dirs_in_checkout()
    yield
    new = sorted(str(p.relative_to(REPO)) for p in _hydra_dirs_in_checkout() - before)
    assert not new, (
        f"this test wrote {new} into the checkout: pass hydra.run.dir=<tmp_path>/... (and "
        "hydra.sweep.dir for -m) to every script it runs"
    )
