"""Distillation: the training loop, its step, losses, teacher cache, checkpoints. The names
other stages may use, each imported from its module on first use (:mod:`distill.exports`)."""

from distill.exports import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {"run": "loop"})
