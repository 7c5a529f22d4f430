#!/usr/bin/env python
"""Aggregate runs into one memory-vs-quality frontier.

    python scripts/report.py multirun/2026-11-26/16-00-00          # a Hydra multirun dir
    python scripts/report.py outputs/a outputs/b --out reports/     # several run dirs
    python scripts/report.py multirun/... --metric teacher_text_kl   # ranked by a fidelity set

Writes frontier.md, frontier.csv, frontier.json and frontier.png (into --out, default the
single folder given, else the current folder) and prints the table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import _pathfix  # noqa: F401  (must precede `import distill`; see its docstring)

from distill.errors import DistillError
from distill.evaluate.frontier import find_run_dirs, load_points, write_all


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("paths", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--memory-budget-bytes", type=int, default=None)
    ap.add_argument(
        "--metric",
        default="perplexity",
        help="rank and plot by this: perplexity, kl_to_teacher, top1_agreement, "
        "decode_tokens_per_s, or a fidelity figure (<set>_ppl/_kl/_top1 for teacher_text and "
        "extra:<name>, generation_nll, generation_nll_ratio)",
    )
    args = ap.parse_args()
    try:
        runs = find_run_dirs(args.paths)
        if not runs:
            raise DistillError(
                f"no run dirs (report.json, FAILED or config.yaml) under {args.paths}"
            )
        base = args.paths[0] if len(args.paths) == 1 else None
        frontier = load_points(runs, base, args.metric)
        out = args.out or (args.paths[0] if len(args.paths) == 1 else Path("."))
        written = write_all(frontier, out, args.memory_budget_bytes)
    except DistillError as err:
        print(f"distill: error: {err}", file=sys.stderr)
        return 2
    print((out / "frontier.md").read_text())
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
