"""One ``eval.extra_corpora`` entry, parsed: a file or glob, or a ``datasets`` name.

Pure (no distill imports), so the config schema validates entries with the same parser the
evaluate stage reads them with.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ExtraCorpus:
    """``entry`` as written; ``name`` the set it is reported as (``extra:<name>``)."""

    entry: str
    name: str
    # "text_files" or "hf", as data.source names them.
    source: str
    path: str
    config: str | None = None
    split: str = "test"
    text_column: str | None = None

    @staticmethod
    def parse(entry: str) -> ExtraCorpus:
        """``"notes/*.md"`` or ``"hf:<dataset>[:<config>][@<split>][#<column>]"``.

        Raises:
            ValueError: an empty entry or dataset name (the message says the syntax).
        """
        if not isinstance(entry, str) or not entry.strip():
            raise ValueError("empty: give a file, a glob or hf:<dataset>[:<config>][@<split>]")
        if not entry.startswith("hf:"):
            return ExtraCorpus(entry, Path(entry).name or entry, "text_files", entry)
        rest, _, column = entry[3:].partition("#")
        rest, at, split = rest.partition("@")
        path, colon, config = rest.partition(":")
        if not path or (colon and not config) or (at and not split):
            raise ValueError(
                "write hf:<dataset>[:<config>][@<split>][#<text column>], e.g. "
                "hf:wikitext:wikitext-2-raw-v1@test"
            )
        name = path.rstrip("/").split("/")[-1] + (f":{config}" if config else "")
        return ExtraCorpus(entry, name, "hf", path, config or None, split or "test", column or None)
