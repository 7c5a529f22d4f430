#!/usr/bin/env python
"""Quantize a distilled student: python scripts/quantize.py run_dir=outputs/<run> [quant...]

Reads <run>/final/ and writes <run>/quantized/<method>/ for every quant.methods entry and
<run>/quantized/gguf/student-<type>.gguf for every quant.gguf entry, then reloads each in a
fresh process and checks it against the model it was written from (exit 2 if one fails).
"""

import _pathfix  # noqa: F401  (must precede `import distill`; see its docstring)
import hydra
from omegaconf import DictConfig

from distill import quantize
from distill.cli import main_guard


@hydra.main(version_base="1.3", config_path="../configs", config_name="pipeline")
def main(cfg: DictConfig) -> None:
    main_guard(quantize.run, cfg, save=False)


if __name__ == "__main__":
    main()
