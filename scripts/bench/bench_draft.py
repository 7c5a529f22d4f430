#!/usr/bin/env python
"""The student as the teacher's draft model: python scripts/bench/bench_draft.py RUN_DIR [options]

RUN_DIR is a finished run (its teacher from config.yaml, its student in final/). For each
held-out chat prompt of the run's generation set, the teacher decodes greedily at batch 1,
alone and with the student as transformers' assistant model at each draft length; prints the
wall-clock speed-up and whether every assisted output was the teacher's own, token for token.
With --gguf, the same in llama.cpp: the teacher's F16 GGUF (the quantize stage's) decoding
with llama-cpp-python's speculative decoding, each of the run's GGUF students drafting.
The report's draft table (tokens per teacher pass) is what this measures in wall time.

    python scripts/bench/bench_draft.py outputs/2026-12-07/19-00-00 --lengths 1 2 4 8
    python scripts/bench/bench_draft.py outputs/2026-12-07/19-00-00 --gguf q4_0 q8_0
"""

import argparse
import json
import sys
from pathlib import Path

import torch

from distill import cli  # noqa: F401  (cli registers the config schema)
from distill.caches import cache_root
from distill.errors import DistillError
from distill.evaluate.draft import assisted_speed, llama_cpp_speeds
from distill.evaluate.fidelity import fidelity_inputs
from distill.models import Teacher, default_threads, load_causal_lm


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--lengths", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--gguf", nargs="*", default=[], help="the run's GGUF types to draft with")
    args = p.parse_args()
    from omegaconf import OmegaConf

    from distill.config import to_pipeline_config

    cfg = to_pipeline_config(OmegaConf.load(args.run_dir / "config.yaml"))
    teacher = Teacher(cfg.pair.teacher, cache_root(cfg))
    inputs = fidelity_inputs(cfg, teacher.tokenizer)
    if inputs is None or not inputs.generation:
        raise DistillError("the run's eval.fidelity has no generation set to take prompts from")
    prompts = [p.tokens for p in inputs.generation[: args.prompts]]
    student = load_causal_lm(args.run_dir / "final").eval()
    torch.manual_seed(0)
    print(
        f"{len(prompts)} prompts, {args.tokens} greedy tokens each, batch 1, "
        f"{torch.get_num_threads()} threads"
    )
    print(
        "| runtime | draft tokens | teacher alone s | with the student s | speed-up | identical |"
    )
    print("|---|---:|---:|---:|---:|:---:|")
    for k in args.lengths:
        _print_row("PyTorch", k, assisted_speed(teacher.model, student, prompts, args.tokens, k))
    if args.gguf:
        records = json.loads((args.run_dir / "quantized" / "quantize.json").read_text())
        by_method = {r["method"]: r for r in records}
        if "teacher-gguf-f16" not in by_method:
            raise DistillError("the run has no teacher GGUF F16 (eval.teacher_gguf=true makes it)")
        f16 = Path(by_method["teacher-gguf-f16"]["dst"])
        threads = default_threads()
        for gguf_type in args.gguf:
            draft = args.run_dir / "quantized" / "gguf" / f"student-{gguf_type}.gguf"
            timed = llama_cpp_speeds(f16, draft, prompts, args.tokens, args.lengths, threads)
            for r in timed["by_draft_length"]:
                row = {**r, "teacher_s": timed["teacher_s"], "answers": timed["answers"]}
                row["tokens"] = timed["tokens"]
                _print_row(f"llama.cpp, {gguf_type} draft", r["draft_length"], row)
    return 0


def _print_row(runtime: str, k: int, r: dict) -> None:
    same = "yes" if r["identical"] else "**no**"
    if "identical_answers" in r and not r["identical"]:
        same += (
            f": {r['identical_answers']}/{r['answers']} answers, "
            f"{r['shared_prefix']}/{r['tokens']} tokens before the first difference"
        )
    print(
        f"| {runtime} | {k} | {r['teacher_s']:.1f} | {r['assisted_s']:.1f} | "
        f"{r['speedup']:.2f}× | {same} |"
    )


if __name__ == "__main__":
    try:
        sys.exit(main())
    except DistillError as err:
        sys.exit(f"error: {err}")
