"""distill: a teacher language model distilled into a small quantized student.

Importing any part of the package first silences three known, harmless messages that every
command would otherwise print (nothing else is hidden; stdlib only, so the parity child that
imports :mod:`distill.models.conv1d` alone pays nothing for it):

* torchao logs ``Failed to load .../_C_mxfp8...so`` and ``.../_C_cutlass_90a...so`` when it
  is imported on a CPU-only torch: those two extensions hold CUDA kernels (MX-FP8, SM90
  CUTLASS) that cannot load there and that no CPU path uses;
* torch's pytree logs a deprecation warning when torchao registers its own enums
  (``KernelPreference``, ...) with ``register_constant``, torchao's code, not ours;
* torchao's ``kernel.intmm`` warns ``Detected no triton`` on import: Triton kernels are GPU
  kernels, so on a CPU-only torch there is nothing they could have run.
"""

from __future__ import annotations

import logging
import sys

# torchao/__init__.py: logger.warning(f"Failed to load {file}: {e}") per ``_C*.so`` file.
_CUDA_ONLY_EXTENSIONS = ("_C_mxfp8.", "_C_cutlass_90a.")


def _cpu_torch() -> bool:
    """True on a CPU-only torch build, where the CUDA extensions can never load. torchao
    imports torch before it logs, so this reads the loaded module instead of importing it."""
    torch = sys.modules.get("torch")
    return torch is not None and getattr(getattr(torch, "version", None), "cuda", "") is None


class _KnownNoise(logging.Filter):
    """Drops exactly the three messages described in the module docstring."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "torchao.kernel.intmm":
            return not (_cpu_torch() and "Detected no triton" in record.getMessage())
        if record.name == "torchao":
            message = record.getMessage()
            cuda_only = any(name in message for name in _CUDA_ONLY_EXTENSIONS)
            return not (_cpu_torch() and message.startswith("Failed to load") and cuda_only)
        if record.name == "torch.utils._pytree" and "register_constant()" in str(record.msg):
            enum_class = record.args[0] if isinstance(record.args, tuple) and record.args else None
            return not getattr(enum_class, "__module__", "").startswith("torchao")
        return True


def _silence_known_noise() -> None:
    noise = _KnownNoise()
    # Filters on the emitting loggers themselves (not handlers): they hold whatever handlers
    # torch's logging setup attaches later, and other loggers are untouched.
    for name in ("torchao", "torch.utils._pytree", "torchao.kernel.intmm"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _KnownNoise) for f in logger.filters):
            logger.addFilter(noise)


_silence_known_noise()
