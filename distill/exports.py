"""A stage's public names, imported on first use: what a stage package's ``__init__`` declares.

Every stage package (``distill.models``, ``distill.train``, ...) lists the names other stages
may use in ``__all__``, each mapped to the module that defines it; another stage imports them
from the package (``from distill.quantize import calibrate``), never from its modules
(tests/test_layering.py holds every module to that). Resolving a name on first use keeps
``import distill.<stage>`` as light as the name asked for: a stage whose public names span
torch, torchao and llama.cpp does not import all of them for one of its functions.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(
    package: str, names: dict[str, str]
) -> tuple[list[str], Callable[[str], Any], Callable[[], list[str]]]:
    """``__all__``, ``__getattr__`` and ``__dir__`` for ``package``, whose public ``names``
    map to the submodule (relative to the package) defining each."""

    def getattr_(name: str) -> Any:
        module = names.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{module}"), name)

    def dir_() -> list[str]:
        return sorted(names)

    return sorted(names), getattr_, dir_
