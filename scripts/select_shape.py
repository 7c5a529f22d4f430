"""Choose a student shape for a budget: every depth x kv groups x hidden size with the widest
MLP that fits, each pruned from the teacher and scored by KL to it on training blocks; then
the best few trained a few steps each and scored again.

    python scripts/select_shape.py --budget 0.58 --depths 14 17 20 --finalists 3 --steps 16

The search ``pair.student.budget`` runs (distill/models/shape_search.py), on the default
config's teacher, corpus, loss and learning rate (configs/pipeline.yaml), and the same cache:
a run with the same budget, depths and finalists then searches nothing. Prints every shape,
best first.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import _pathfix  # noqa: F401  (must precede `import distill`; see its docstring)
from hydra import compose, initialize_config_dir

from distill.caches import cache_root
from distill.cli import depth_from_command_line
from distill.config import to_pipeline_config
from distill.data import prepare_data
from distill.errors import DistillError
from distill.models import load_teacher
from distill.models.footprint import weights_hash
from distill.models.layer_search import format_ranges
from distill.models.shape_search import count_params, default_depths, final_kl, search_shape
from distill.train.short_train import finalists

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, required=True, help="fraction of the teacher")
    p.add_argument("--depths", type=int, nargs="*", help="depths to try (default: four)")
    p.add_argument("--finalists", type=int, default=3, help="shapes trained (0: none)")
    p.add_argument("--steps", type=int, default=16, help="training steps per finalist")
    args = p.parse_args()
    overrides = [
        f"pair.student.budget={args.budget}",
        f"pair.student.budget_finalists={args.finalists}",
        f"pair.student.budget_finalist_steps={args.steps}",
    ]
    if args.depths:
        overrides.append(f"pair.student.budget_depths=[{','.join(map(str, args.depths))}]")
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        composed = depth_from_command_line(compose("pipeline", overrides), overrides)
    cfg = to_pipeline_config(composed)
    cache = cache_root(cfg)
    teacher, tok = load_teacher(cfg.pair.teacher, cache)
    data = prepare_data(cfg.data, tok, cache)
    depths = args.depths or default_depths(teacher.config, args.budget)
    start = time.perf_counter()
    shape, layers, ranked = search_shape(
        teacher,
        data.train,
        args.budget,
        depths,
        cache,
        weights_hash(teacher),
        finalists(cfg, teacher),
    )
    seconds = time.perf_counter() - start
    total = count_params(teacher.config)
    print(f"\n{len(ranked)} shapes within {args.budget:.3f} of {total / 1e6:.1f}M, {seconds:.0f} s")
    steps = [str(s) for s in sorted({int(k) for r in ranked for k in r.get("kl_trained", {})})]
    after = "".join(f" KL after {s} steps |" for s in steps)
    print(f"| layers | MLP | kv groups | hidden | params | KL pruned |{after}")
    print("|---:|---:|---:|---:|---:|---:|" + "---:|" * len(steps))
    for r in ranked:
        s, trained = r["shape"], r.get("kl_trained", {})
        cells = "".join(f" {trained[k]:.4f} |" if k in trained else " |" for k in steps)
        print(
            f"| {s['num_layers']} | {s['intermediate_size']} | {s['num_key_value_heads']} | "
            f"{s['hidden_size']} | {r['params'] / 1e6:.1f}M | {r['kl']:.4f} |{cells}"
        )
    why = f"KL {final_kl(ranked[0]):.4f} trained" if "kl_trained" in ranked[0] else "pruned KL"
    print(f"\nchosen ({why}): {shape} on teacher layers {format_ranges(layers)}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except DistillError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
