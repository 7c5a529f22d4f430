"""Publish: a Hugging Face folder with a model card, variants in subfolders. The names other
stages may use, each imported from its module on first use (:mod:`distill.exports`)."""

from distill.exports import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {"run": "stage", "finished": "stage"})
