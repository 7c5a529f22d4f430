"""``eval.extra_corpora``: corpora no model trained on, scored like the held-out blocks.

Each entry (:class:`distill.extra_corpus.ExtraCorpus`) is read by the corpus loaders of
:mod:`distill.data` and cut into ``data.block_size`` blocks; file entries are checked before
any model loads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from distill.config import DataConfig, EvalConfig
from distill.errors import DistillError
from distill.extra_corpus import ExtraCorpus

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from distill.config import PipelineConfig


class FidelityError(DistillError):
    """A fidelity set cannot be built from what the config names."""


def check_extra_corpora(ev: EvalConfig) -> None:
    """Cheap check before any model loads: every file entry of ``eval.extra_corpora`` names
    at least one file (``datasets`` names are only resolved when read).

    Raises:
        FidelityError: naming the entry that matches no file.
    """
    from distill.data import DataError, expand_paths

    for corpus in map(ExtraCorpus.parse, ev.extra_corpora):
        if corpus.source == "text_files":
            try:
                expand_paths([corpus.path])
            except DataError:
                raise FidelityError(
                    f"eval.extra_corpora entry {corpus.entry!r} matches no file: check the path "
                    "or glob (or write hf:<dataset> for a datasets name)"
                ) from None


def extra_blocks(
    corpus: ExtraCorpus, cfg: PipelineConfig, tokenizer: PreTrainedTokenizerBase
) -> torch.Tensor:
    """The first ``eval.extra_corpus_blocks`` blocks ``(n, data.block_size)`` of ``corpus``,
    read by the corpus loaders of :mod:`distill.data`.

    Raises:
        FidelityError: naming the entry, when it cannot be read or fills no block.
    """
    from distill.data import DataError, load_documents, pack_documents

    column = corpus.text_column or cfg.data.text_column
    if corpus.source == "hf":
        data = DataConfig(
            source="hf",
            path=corpus.path,
            name=corpus.config,
            split=corpus.split,
            text_column=column,
        )
    else:
        data = DataConfig(source="text_files", paths=[corpus.path], text_column=column)
    try:
        docs = load_documents(data)
    except DataError as err:
        raise FidelityError(f"eval.extra_corpora entry {corpus.entry!r}: {err}") from None
    blocks = pack_documents(docs, tokenizer, cfg.data.block_size)[: cfg.eval.extra_corpus_blocks]
    if blocks.shape[0] == 0:
        raise FidelityError(
            f"eval.extra_corpora entry {corpus.entry!r} holds fewer tokens than one block of "
            f"data.block_size={cfg.data.block_size}: add text or drop the entry"
        )
    return blocks
