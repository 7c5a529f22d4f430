#!/usr/bin/env python
"""Distill a student from the teacher: python scripts/distill.py [key=value ...]

Writes checkpoints/, final/, student_init/, metrics.jsonl and tensorboard/ into the Hydra
run dir. Also runs under `accelerate launch`.
"""

import os
import sys

# This file is named like the package; drop its folder from the import path so that
# `import distill` finds the package, not this script.
_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from distill import train  # noqa: E402
from distill.cli import main_guard  # noqa: E402


@hydra.main(version_base="1.3", config_path="../configs", config_name="pipeline")
def main(cfg: DictConfig) -> None:
    main_guard(train.run, cfg, save=True)


if __name__ == "__main__":
    main()
