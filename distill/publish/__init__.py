"""Publish: a Hugging Face folder with a model card, variants in subfolders."""

from distill.publish.stage import run

__all__ = ["run"]
