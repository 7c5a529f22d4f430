"""What the README and docs/ tell a user holds: every command they show composes against the
real config, every file, folder and config option they name exists, and the README's map of
the code is the tree. Nothing here loads a model."""

from __future__ import annotations

import re
import shlex
from itertools import product
from pathlib import Path

import pytest

from tests.conftest import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# Scripts whose arguments are Hydra overrides (the others take argparse flags).
HYDRA_SCRIPTS = {"pipeline", "distill", "quantize", "evaluate", "publish", "cache_teacher"}
# Path-like mentions that are a run's own output or a placeholder, not files of the project.
NOT_PROJECT = ("outputs/", "multirun/", "/models/", "corpus/", "data/", "notes/")


def _fenced(text: str) -> list[str]:
    """The lines of the shell code blocks (```bash, ```sh or unlabelled), continuations joined."""
    out: list[str] = []
    for lang, body in re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.M | re.S):
        if lang not in ("", "bash", "sh", "shell", "console"):
            continue
        out += body.replace("\\\n", " ").splitlines()
    return out


def _inline(text: str) -> list[str]:
    """Commands written inline: code spans that run a script."""
    spans = re.findall(r"`([^`\n]+)`", text)
    return [s for s in spans if re.search(r"(^|\s|/)scripts/[\w/]+\.py", s)]


def commands() -> list[tuple[str, str]]:
    """``(file, command)`` for every command the README and docs show."""
    found = []
    for doc in DOCS:
        text = doc.read_text()
        for line in _fenced(text) + _inline(text):
            line = line.strip()
            if re.search(r"scripts/[\w/]+\.py|^make\b|accelerate launch", line):
                found.append((doc.name, line))
    return found


COMMANDS = commands()


def _script_and_args(command: str) -> tuple[Path | None, list[str]]:
    # A <placeholder> stands for the reader's own value: any value of its kind composes.
    words = shlex.split(re.sub(r"<[^<>]+>", "placeholder", command), comments=True)
    for i, word in enumerate(words):
        if re.search(r"(^|/)scripts/[\w/]+\.py$", word):
            return REPO / word[word.index("scripts/") :], words[i + 1 :]
    return None, words


def _expand(overrides: list[str]) -> list[list[str]]:
    """A multirun's overrides as single runs: each swept key at each of its values."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    choices = []
    for text, o in zip(overrides, parsed, strict=True):
        if o.is_sweep_override():
            key = o.get_key_element()
            choices.append([f"{key}={v}" for v in o.sweep_string_iterator()])
        else:
            choices.append([text])
    return [list(c) for c in product(*choices)]


def _check_hydra(overrides: list[str]) -> None:
    from distill.config import to_pipeline_config
    from tests.conftest import compose

    config = [o for o in overrides if not o.startswith("hydra")]
    for o in overrides:
        if o.startswith("hydra/"):  # a Hydra config group choice: its file must exist
            group, _, choice = o.partition("=")
            assert (REPO / "configs" / group / f"{choice}.yaml").is_file(), o
    for single in _expand(config):
        to_pipeline_config(compose(single))  # raises, naming the field, on a bad override


def _check_argparse(script: Path, args: list[str]) -> None:
    source = script.read_text()
    for arg in args:
        if arg.startswith("--"):
            flag = arg.split("=", 1)[0]
            assert f'"{flag}"' in source, f"{script.name} has no option {flag}"


@pytest.mark.parametrize("doc,command", COMMANDS, ids=[f"{d}:{c[:60]}" for d, c in COMMANDS])
def test_every_command_shown_runs_against_the_real_config(doc: str, command: str) -> None:
    words = shlex.split(command, comments=True)
    if words[0] == "make" or " make " in f" {command} ":
        targets = re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), flags=re.M)
        target = words[words.index("make") + 1]
        assert target in targets, f"Makefile has no target {target}"
        return
    if "--config_file" in words:
        assert (REPO / words[words.index("--config_file") + 1]).is_file(), command
    script, args = _script_and_args(command)
    if script is None:
        return
    assert script.is_file(), f"{doc}: {script} does not exist"
    if script.stem in HYDRA_SCRIPTS:
        _check_hydra([a for a in args if "=" in a and not a.startswith("-")])
    else:
        _check_argparse(script, args)


def test_the_commands_are_found() -> None:
    # The extraction above must see the README's own commands, or every test passes vacuously.
    readme = [c for d, c in COMMANDS if d == "README.md"]
    assert any(c.startswith("make run") for c in readme)
    assert sum("scripts/pipeline.py" in c for c in readme) >= 5
    assert any("scripts/report.py" in c for c in readme)


def _mentioned_paths(text: str) -> set[str]:
    found = set(
        re.findall(r"(?<![\w./~-])((?:distill|scripts|configs|tests|docs)/[\w./-]*\w)", text)
    )
    return {p for p in found if not p.startswith(NOT_PROJECT) and "*" not in p}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_file_and_folder_named_exists(doc: Path) -> None:
    text = doc.read_text()
    missing = sorted(p for p in _mentioned_paths(text) if not (REPO / p).exists())
    # Markdown links are relative to the file holding them.
    for link in re.findall(r"\]\(([^)#\s]+)\)", text):
        if not re.match(r"\w+://", link) and not (doc.parent / link).exists():
            missing.append(link)
    assert not missing, f"{doc.name} names what does not exist: {missing}"


def _map_block() -> str:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Where things are", 1)[1]
    return re.search(r"```\n(.*?)```", section, flags=re.S).group(1)


def _groups(block: str) -> dict[str, set[str]]:
    """The map's module names by folder: a line indented 2 that starts with ``<name>/`` opens
    that folder (``distill/`` otherwise), an unindented one opens a top-level folder, and
    deeper lines continue the folder above them."""
    groups: dict[str, set[str]] = {}
    current = ""
    for line in block.splitlines():
        words = line.split()
        indent = len(line) - len(line.lstrip())
        if not words:
            continue
        if indent == 0:
            current = words[0]
        elif indent == 2:
            current = words[0] if words[0].endswith("/") else "distill/"
        groups.setdefault(current, set()).update(re.findall(r"\w+\.py", line))
    return groups


def _modules(folder: Path) -> set[str]:
    return {p.name for p in folder.glob("*.py") if not p.name.startswith("_")}


def test_the_map_of_the_code_is_the_tree() -> None:
    block = _map_block()
    groups = _groups(block)
    assert groups["distill/"] == _modules(REPO / "distill")
    for stage in ("config", "models", "train", "quantize", "evaluate", "publish"):
        assert groups[f"{stage}/"] == _modules(REPO / "distill" / stage), stage
    scripts = _modules(REPO / "scripts") | _modules(REPO / "scripts" / "bench")
    assert groups["scripts/"] == scripts
    folders = {line.split()[0]: line.split()[1:] for line in block.splitlines() if line[:1] != " "}
    assert set(folders["configs/"]) == {p.name for p in (REPO / "configs").iterdir() if p.is_dir()}
    assert set(folders["docs/"]) == {p.stem for p in (REPO / "docs").glob("*.md")}


def test_the_readme_is_short_and_starts_with_the_two_commands() -> None:
    readme = (REPO / "README.md").read_text()
    assert len(readme.encode()) <= 15_000
    first = readme.splitlines()[:4]
    assert first[1].startswith("make run") and first[2].startswith("make test")
    contents = readme.split("## Contents", 1)[1].split("\n## ", 1)[0]
    assert contents.index("own teacher") < contents.index("Load the result") < 400
