"""The errors a user can fix. Scripts print them as one line (:func:`distill.cli.main_guard`).

Every stage raises its own subclass (``ModelError``, ``DataError``, ``QuantizeError``, ...);
they all derive from :class:`DistillError`, which is what the entry points catch.
"""

from __future__ import annotations


class DistillError(Exception):
    """A problem the user can fix (bad input, bad config). Scripts print it as one line."""


class ConfigError(DistillError):
    """One or more configuration fields are invalid."""
