"""Post-training quantization: torchao folders, GGUF files, parity checks."""

from distill.quantize.stage import run

__all__ = ["run"]
