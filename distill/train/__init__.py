"""Distillation: the training loop, its step, losses, teacher cache, checkpoints."""

from distill.train.loop import run

__all__ = ["run"]
