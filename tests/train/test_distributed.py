"""`accelerate launch` with two CPU processes equals one process with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.conftest import REPO, tiny_overrides


def _run(cmd: list[str]) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_two_processes_match_one(tmp_path: Path, tiny_teacher_dir, tiny_corpus_dir) -> None:
    args = tiny_overrides(tiny_teacher_dir, tiny_corpus_dir, tmp_path / "cache")
    script = str(REPO / "scripts" / "distill.py")
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    out = _run(
        [
            accelerate,
            "launch",
            "--config_file",
            str(REPO / "configs/accelerate/cpu_2proc.yaml"),
            script,
            *args,
            "train.batch_size=1",
            f"hydra.run.dir={tmp_path}/two",
        ]
    )
    # Really two processes (`accelerate launch --cpu` would silently start one).
    assert "accelerate: MULTI_CPU, 2 process(es)" in out
    _run([sys.executable, script, *args, "train.batch_size=2", f"hydra.run.dir={tmp_path}/one"])
    one = load_file(str(tmp_path / "one/final/model.safetensors"))
    two = load_file(str(tmp_path / "two/final/model.safetensors"))
    start = load_file(str(tmp_path / "one/student_init/model.safetensors"))
    assert one.keys() == two.keys()
    for key in one:
        assert torch.allclose(one[key], two[key], atol=1e-5), key
    assert any(not torch.equal(one[k], start[k]) for k in one)  # training moved the weights
    # Only the main process writes: one metrics row per step, not two.
    rows = (tmp_path / "two/metrics.jsonl").read_text().splitlines()
    assert sum('"kind": "train"' in r for r in rows) == 4

    # README "Scaling out": one process on that run dir goes on without training it again
    # (its config.yaml says batch 1, the checkpoints say 2 processes of it).
    out = _run([sys.executable, script, f"run_dir={tmp_path}/two", f"hydra.run.dir={tmp_path}/3"])
    assert "not training again" in out
    assert (tmp_path / "two/metrics.jsonl").read_text().splitlines() == rows
    again = load_file(str(tmp_path / "two/final/model.safetensors"))
    assert all(torch.equal(again[k], two[k]) for k in two)
