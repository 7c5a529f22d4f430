#!/usr/bin/env python
"""Show that SIGKILL + `train.resume=auto` ends with the weights of an uninterrupted run.

    python scripts/check_resume.py            # embedded teacher, small config (~5 min, 2 cores)
    python scripts/check_resume.py --tiny     # microscopic in-process teacher (~1 min)

1. runs scripts/distill.py to the end (the reference);
2. runs the same command again, waits for its first complete checkpoint, sleeps a random
   moment and kills it with SIGKILL (mid-step or mid-save, wherever it is);
3. reruns that command with train.resume=auto;
4. compares every tensor of both final/ folders with torch.equal.
Exits 0 only when all tensors are identical.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _pathfix  # noqa: F401  (must precede `import distill`; see its docstring)
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
SMALL = [
    "data.block_size=64",
    "train.max_steps=8",
    "train.batch_size=2",
    "train.save_every_n_steps=2",
    "train.eval_every_n_steps=4",
    "train.eval_max_blocks=2",
    "train.warmup_steps=2",
]


def tiny_teacher(folder: Path) -> list[str]:
    """A 4-layer llama with a BPE tokenizer trained on pydoc text, saved to ``folder``."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    text = [topics[k] for k in sorted(topics)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<eos>"], show_progress=False)
    tok.train_from_iterator(text, trainer=trainer)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(hf_tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    LlamaForCausalLM(cfg).save_pretrained(str(folder))
    hf_tok.save_pretrained(str(folder))
    return [
        f"pair.teacher.name_or_path={folder}",
        "pair.teacher.gguf_file=null",
        "pair.student.layers=[0,3]",
        "train.max_steps=300",
        "train.save_every_n_steps=25",
        "train.eval_every_n_steps=100",
    ]


def command(run_dir: Path, extra: list[str]) -> list[str]:
    return [
        sys.executable,
        str(REPO / "scripts" / "distill.py"),
        f"hydra.run.dir={run_dir}",
        *extra,
    ]


def first_checkpoint_done(run_dir: Path) -> bool:
    return any((run_dir / "checkpoints").glob("step-*/COMPLETE"))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="use a microscopic in-process teacher")
    parser.add_argument("--seed", type=int, default=None, help="seed of the random kill moment")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="check_resume-"))
    work.mkdir(parents=True, exist_ok=True)
    extra = list(SMALL)
    if args.tiny:
        extra += tiny_teacher(work / "teacher")
    rng = random.Random(args.seed)
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}

    t0 = time.time()
    subprocess.run(command(work / "straight", extra), check=True, cwd=REPO, **quiet)
    straight_s = time.time() - t0
    print(f"uninterrupted run: {straight_s:.0f} s -> {work / 'straight'}")

    killed = work / "killed"
    started = time.time()
    proc = subprocess.Popen(command(killed, extra), cwd=REPO, **quiet)
    while not first_checkpoint_done(killed):
        if proc.poll() is not None:
            print("the run ended before its first checkpoint", file=sys.stderr)
            return 1
        time.sleep(0.05)
    remaining = straight_s - (time.time() - started)
    # A random moment in what remains (mid-step or mid-save), early enough not to miss the run.
    delay = rng.uniform(0.0, 0.7 * max(0.5, remaining))
    time.sleep(delay)
    if proc.poll() is not None:
        print("the run finished before the kill; rerun with another --seed", file=sys.stderr)
        return 1
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    ckpts = sorted(p.name for p in (killed / "checkpoints").iterdir())
    print(
        f"SIGKILL {delay:.1f} s after the first checkpoint; checkpoints folder then held: {ckpts}"
    )

    subprocess.run(command(killed, [*extra, "train.resume=auto"]), check=True, cwd=REPO, **quiet)
    a = load_file(str(work / "straight" / "final" / "model.safetensors"))
    b = load_file(str(killed / "final" / "model.safetensors"))
    same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    differing = [k for k in a if k in b and not torch.equal(a[k], b[k])]
    print(f"resumed run finished; tensors compared: {len(a)}; identical: {same}")
    if differing:
        print(f"differing tensors: {differing[:10]}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
