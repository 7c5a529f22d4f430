#!/usr/bin/env python
"""Distill a student from the teacher: python scripts/distill.py [key=value ...]

Writes checkpoints/, final/, student_init/, metrics.jsonl and tensorboard/ into the Hydra
run dir. Also runs under `accelerate launch`.
"""

import _pathfix  # noqa: F401  (must precede `import distill`; see its docstring)
import hydra
from omegaconf import DictConfig

from distill import train
from distill.cli import main_guard


@hydra.main(version_base="1.3", config_path="../configs", config_name="pipeline")
def main(cfg: DictConfig) -> None:
    main_guard(train.run, cfg, save=True)


if __name__ == "__main__":
    main()
