"""Benchmarks run end to end on microscopic models (smoke only: no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def test_bench_gpu_runs_on_cpu_with_tiny_models(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "bench" / "bench_gpu.py"),
            "--tiny",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    modes = [r["mode"] for r in result["results"]]
    assert modes[:2] == ["ce", "online"]
    assert all(r["tokens_per_s"] > 0 for r in result["results"])
    assert "tokens/s" in proc.stdout
