#!/usr/bin/env python
"""Evaluate every variant of a run: python scripts/evaluate.py run_dir=outputs/<run> [eval...]

Writes <run>/report.json, report.md and memory_vs_quality.png.
"""

import _pathfix  # noqa: F401  (must precede `import distill`; see its docstring)
import hydra
from omegaconf import DictConfig

from distill import evaluate
from distill.cli import main_guard


@hydra.main(version_base="1.3", config_path="../configs", config_name="pipeline")
def main(cfg: DictConfig) -> None:
    main_guard(evaluate.run, cfg, save=False)


if __name__ == "__main__":
    main()
