"""Evaluation: quality, memory and speed of every variant; the report and the frontier."""

from distill.evaluate.stage import run

__all__ = ["run"]
