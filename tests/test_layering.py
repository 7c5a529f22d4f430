"""The house rules of ``distill/``, checked on every module's imports (all of them, those inside
functions too):

1. A stage (``distill/<stage>/``: models, train, quantize, evaluate, publish) uses another
   stage only through that stage's package and only the names its ``__init__`` lists in
   ``__all__``: ``from distill.quantize import calibrate``, never ``from distill.quantize.stage
   import calibrate`` and never a ``_private`` name. What a stage exports is its contract.
2. Shared ground (the modules directly in ``distill/``, but for the entry layer: ``pipeline``,
   ``cli``, ``preflight``) lies below every stage and imports none.
3. The stages before evaluation (models, train, quantize) never import ``distill.evaluate`` or
   ``distill.publish``: what they need from evaluation is shared ground (``distill.metrics``).
4. No circle: following imports from any module never leads back to it.
5. No module is longer than 500 lines.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import distill

ROOT = Path(distill.__file__).parent
STAGES = ("models", "train", "quantize", "evaluate", "publish")
ENTRY = {"distill.pipeline", "distill.cli", "distill.preflight"}
BEFORE_EVALUATION = ("models", "train", "quantize")


def _modules() -> dict[str, Path]:
    out = {}
    for info in pkgutil.walk_packages([str(ROOT)], "distill."):
        module = importlib.import_module(info.name)  # every module imports cleanly
        out[info.name] = Path(module.__file__)
    return out


MODULES = _modules()


def _stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in STAGES else None


def _imports(path: Path, module: str) -> list[tuple[str, list[str], int]]:
    """``(imported module, names taken from it, line)`` of every import in the file."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.startswith("distill")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            if base.startswith("distill"):
                out.append((base, [a.name for a in node.names], node.lineno))
    return out


def _violations() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {"stage": [], "shared": [], "order": []}
    for module, path in MODULES.items():
        own = _stage(module)
        for target, names, line in _imports(path, module):
            where = f"{module}:{line} imports {target}"
            parts = target.split(".")
            other = parts[1] if len(parts) > 1 and parts[1] in STAGES else None
            if other is None or other == own:
                continue
            if own in BEFORE_EVALUATION and other in ("evaluate", "publish"):
                found["order"].append(where)
            if own is None and module not in ENTRY and module.count(".") == 1:
                found["shared"].append(where)
            if own is None:
                continue
            public = getattr(importlib.import_module(f"distill.{other}"), "__all__", [])
            if len(parts) > 2:
                found["stage"].append(f"{where} (a module of another stage)")
            bad = [n for n in names if n.startswith("_") or n not in public]
            if bad:
                found["stage"].append(f"{where}: {bad} not in distill.{other}.__all__")
    return found


VIOLATIONS = _violations()


@pytest.mark.parametrize("rule", ["stage", "shared", "order"])
def test_imports_keep_the_house_rules(rule: str) -> None:
    assert VIOLATIONS[rule] == []


def test_no_import_circles() -> None:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module, path in MODULES.items():
        for target, names, _ in _imports(path, module):
            # "from distill.models import Teacher" reaches the package and the module that
            # defines the name; "from distill.quantize import stage" reaches a submodule.
            for candidate in [target, *(f"{target}.{n}" for n in names)]:
                if candidate in graph and candidate != module:
                    graph[module].add(candidate)
    # A package __init__ that only names its modules (distill.exports) imports them lazily:
    # importing the package runs none of them, so its edges are not import-time edges.
    for package in [f"distill.{s}" for s in STAGES]:
        graph[package] = {t for t in graph[package] if not t.startswith(package + ".")}
    circles = []
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                circles.append(" -> ".join(trail[trail.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert circles == []


def test_no_module_over_500_lines() -> None:
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > 500}
    assert long == {}
