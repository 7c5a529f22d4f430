"""``scripts/pipeline.py``, killed (SIGKILL, no cleanup of any kind) inside one stage.

    python tests/kill_runner.py <stage> [hydra overrides ...]

The stage's own code runs unchanged up to a point where it has written part of its outputs,
then the process kills itself, as a node failure or an OOM killer would:

* train: right after the first checkpoint is saved (a step between it and the end);
* quantize: after every artifact is written, before their parity check;
* evaluate: after the first saved variant's row (the teacher's and the first student's done);
* publish: after the folder is assembled, before it is swapped into place.

tests/test_resume.py reruns the pipeline after each kill. Only this runner patches anything;
the distill code it runs is the code a user runs.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _after(module: Any, name: str, calls: int = 1) -> None:
    """Kill the process once ``module.name`` has returned ``calls`` times."""
    real = getattr(module, name)
    seen = []

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        out = real(*args, **kwargs)
        seen.append(1)
        if len(seen) == calls:
            _die()
        return out

    setattr(module, name, wrapper)


def _before(module: Any, name: str) -> None:
    """Kill the process when ``module.name`` is called."""
    setattr(module, name, lambda *args, **kwargs: _die())


def main() -> None:
    stage, overrides = sys.argv[1], sys.argv[2:]
    if stage == "train":
        from distill.train import loop

        _after(loop, "save_checkpoint")
    elif stage == "quantize":
        from distill.quantize import stage as quantize

        _before(quantize, "_check_parity")
    elif stage == "evaluate":
        from distill.evaluate import stage as evaluate

        _after(evaluate, "evaluate_saved")
    elif stage == "publish":
        from distill.publish import stage as publish

        _before(publish, "check_finite")
    elif stage != "none":
        raise SystemExit(f"unknown stage {stage!r}")
    sys.argv = [str(REPO / "scripts" / "pipeline.py"), *overrides]
    sys.path.insert(0, str(REPO / "scripts"))
    runpy.run_path(str(REPO / "scripts" / "pipeline.py"), run_name="__main__")


if __name__ == "__main__":
    main()
