#!/usr/bin/env python
"""The whole pipeline in one run dir: python scripts/pipeline.py [key=value ...]

distill -> quantize -> evaluate -> publish; prints the report table and the paths of the
run dir and the publish folder. Hydra multirun (-m) sweeps it.
"""

import _pathfix  # noqa: F401  (must precede `import distill`; see its docstring)
import hydra
from omegaconf import DictConfig

from distill import pipeline
from distill.cli import main_guard


@hydra.main(version_base="1.3", config_path="../configs", config_name="pipeline")
def main(cfg: DictConfig) -> None:
    main_guard(pipeline.run, cfg, save=True)


if __name__ == "__main__":
    main()
