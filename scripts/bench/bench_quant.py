#!/usr/bin/env python
"""Decode speed vs bytes of every variant: python scripts/bench/bench_quant.py RUN_DIR [options]

RUN_DIR holds final/ and quantized/ (a finished run, or one made by --from-teacher). Prints,
for each variant, decode tokens/s and its speed-up over the fp32 student (median of
back-to-back paired runs) next to its byte ratio, and the thread count and load. With
--compiled, also each one where it deploys, side by side: compiled PyTorch fp32 and int8, and
llama.cpp for every --gguf file, each against its bandwidth bound and llama.cpp's Q8_0 rate.

    python scripts/bench/bench_quant.py outputs/2026-11-26/15-30-00
    python scripts/bench/bench_quant.py /tmp/bench --from-teacher --profile int8_weight_only
    python scripts/bench/bench_quant.py RUN --methods int8_weight_only --gguf q8_0,q4_0 --compiled
"""

import argparse
import logging
from pathlib import Path

import bench_lib as bench
import torch

from distill import cli  # noqa: F401  (cli registers the config schema)
from distill.config import PipelineConfig, to_pipeline_config
from distill.names import QUANT_METHODS


def default_config(overrides: list[str]) -> PipelineConfig:
    """The shipped default config (configs/pipeline.yaml) with ``overrides``."""
    from hydra import compose, initialize_config_dir

    configs = Path(__file__).resolve().parents[2] / "configs"  # scripts/bench/ -> checkout
    with initialize_config_dir(config_dir=str(configs), version_base="1.3"):
        return to_pipeline_config(compose(config_name="pipeline", overrides=overrides))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--methods", default="int8_weight_only,int8_dynamic,int4_weight_only,bf16")
    p.add_argument("--gguf", default="", help="GGUF types to include, e.g. q4_0")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument(
        "--llama-threads", type=int, default=None, help="llama.cpp threads (default: the cores)"
    )
    p.add_argument("--from-teacher", action="store_true", help="cut and quantize the default pair")
    p.add_argument("--profile", default=None, help="variant to profile one decode of")
    p.add_argument(
        "--profile-compiled",
        default=None,
        help="variant to profile one compiled decode of (where its time goes, by kernel)",
    )
    p.add_argument(
        "--compiled",
        action="store_true",
        help="also time each variant compiled (torch.compile, ~30-40 s of compiling each)",
    )
    args = p.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    gguf = [t for t in args.gguf.split(",") if t]
    bad = [m for m in methods if m not in QUANT_METHODS]
    if bad:
        p.error(f"unknown methods {bad}: choose from {', '.join(QUANT_METHODS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.from_teacher:
        cfg = default_config([f"quant.methods=[{','.join(methods)}]", f"quant.gguf=[{args.gguf}]"])
        bench.prepare_from_teacher(args.run_dir, cfg)

    variants = bench.load_variants(args.run_dir, methods, gguf)
    prompt = bench.prompt_ids(args.run_dir, args.prompt_tokens)
    times = bench.decode_times(variants, prompt, args.new_tokens, args.repeats)
    print(bench.machine_line())
    print(
        f"decode: {args.new_tokens} greedy tokens after a {prompt.shape[1]}-token prompt, "
        f"batch 1; speed = median of {args.repeats} back-to-back (fp32, variant) time ratios"
    )
    print("\n".join(bench.table(variants, times, args.new_tokens)))
    if args.compiled:
        rows = bench.compiled_rates(variants, prompt, args.new_tokens, args.repeats)
        print(
            "\ncompiled (distill.evaluate.compiled_decode: inductor freezing + C++ GEMMs, "
            "static cache, logits checked against eager; sequential runs, not paired):"
        )
        print("\n".join(bench.compiled_table(variants, rows, times, args.new_tokens)))
        deployed = bench.compiled_deployed_rows(variants, rows, prompt, args.new_tokens)
        deployed += bench.llama_cpp_rows(
            args.run_dir, gguf, prompt, args.new_tokens, args.repeats, args.llama_threads
        )
        from distill.evaluate.memory import measure_bandwidth

        bandwidth = measure_bandwidth()
        print(
            f"\nwhere deployed (batch 1, same prompt and lengths; bound = copy bandwidth "
            f"{bandwidth / 1e9:.1f} GB/s / bytes read per token):"
        )
        print("\n".join(bench.deployed_table(deployed, bandwidth)))

    def pick(flag: str, name: str, torch_only: bool = False) -> bench.Variant:
        """The variant a --profile flag names (with or without the student- prefix)."""
        for v in variants:
            if v.name in (name, f"student-{name}") and not (
                torch_only and (v.fast_kernels or v.dequantized_gguf)
            ):
                return v
        p.error(f"{flag} {name}: no such {'torch ' if torch_only else ''}variant")

    if args.profile_compiled:
        chosen = pick("--profile-compiled", args.profile_compiled, torch_only=True)
        print(f"\ntorch.profiler, one compiled decode of {chosen.name}:")
        print(bench.profile_compiled_decode(chosen.model, prompt, args.new_tokens))
    if args.profile:
        chosen = pick("--profile", args.profile)
        print(f"\ntorch.profiler, one decode of {chosen.name}:")
        print(bench.profile_decode(chosen.model, prompt, args.new_tokens, fast=chosen.fast_kernels))


if __name__ == "__main__":
    main()
