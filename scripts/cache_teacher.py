#!/usr/bin/env python
"""Cache the teacher's top-k log-probs over every training block: python scripts/cache_teacher.py

Writes cache_root/teacher_logits/<key>/ (or train.teacher_cache_dir); runs with
train.teacher_mode=cached and the same pair, data, train.teacher_top_k and loss.temperature
then read it instead of running the teacher. Those runs build missing blocks themselves;
this script pays for the whole pass up front, e.g. before a sweep.
"""

import _pathfix  # noqa: F401  (must precede `import distill`; see its docstring)
import hydra
from omegaconf import DictConfig

from distill.cli import main_guard
from distill.train import teacher_cache


@hydra.main(version_base="1.3", config_path="../configs", config_name="pipeline")
def main(cfg: DictConfig) -> None:
    main_guard(teacher_cache.run, cfg, save=False)


if __name__ == "__main__":
    main()
