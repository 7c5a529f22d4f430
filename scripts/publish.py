#!/usr/bin/env python
"""Publish a run as a Hugging Face folder: python scripts/publish.py run_dir=outputs/<run>

Writes <run>/publish/ (model card, weights, tokenizer, quantized variants in subfolders);
pushes to the Hub only when publish.repo_id is set.
"""

import _pathfix  # noqa: F401  (must precede `import distill`; see its docstring)
import hydra
from omegaconf import DictConfig

from distill import publish
from distill.cli import main_guard


@hydra.main(version_base="1.3", config_path="../configs", config_name="pipeline")
def main(cfg: DictConfig) -> None:
    main_guard(publish.run, cfg, save=False)


if __name__ == "__main__":
    main()
