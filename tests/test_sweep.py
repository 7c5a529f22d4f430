"""Sweeps through a cluster launcher: hydra-submitit-launcher's ``submitit_local`` runs the
same jobs its ``submitit_slurm`` would submit (configs/hydra/launcher/slurm.yaml), each as
its own process, so a 2-point sweep here is the cluster path without the cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, tiny_overrides


def test_slurm_launcher_config_carries_the_cluster_settings() -> None:
    from hydra import compose, initialize_config_dir

    import distill.cli  # noqa: F401  (registers the schema)

    overrides = ["hydra/launcher=slurm", "hydra.launcher.partition=gpu"]
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("pipeline", [*overrides, "hydra.launcher.gpus_per_node=4"], True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node, launcher.timeout_min) == ("gpu", 4, 240)
    assert launcher.tasks_per_node == 1  # one process per job: see the file's header


def test_submitit_local_sweep_writes_two_run_dirs_that_report_aggregates(
    tmp_path: Path, tiny_teacher_dir: Path, tiny_corpus_dir: Path
) -> None:
    sweep = tmp_path / "sweep"
    # The jobs import distill in a fresh interpreter: from this checkout, not another one.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    args = [
        "-m",
        *tiny_overrides(tiny_teacher_dir, tiny_corpus_dir, tmp_path / "cache"),
        # Lighter than the default: one torchao variant, one GGUF type, no GPTQ.
        "quant.methods=[int8_weight_only]",
        "quant.gguf=[q8_0]",
        "quant.calibration=none",
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=10",
        f"hydra.sweep.dir={sweep}",
        "loss.kd_ratio=0,1.0",
    ]
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts/pipeline.py"), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
        env=env,
    )
    logs = "\n".join(p.read_text() for p in sweep.glob(".submitit/*/*.err"))
    assert proc.returncode == 0, (proc.stderr[-3000:], logs[-3000:])
    # Through submitit (its per-job folders and results), not Hydra's in-process launcher.
    assert len(list(sweep.glob(".submitit/*/*_result.pkl"))) == 2
    assert sorted(p.name for p in sweep.iterdir() if not p.name.startswith(".")) == [
        "0",
        "1",
        "multirun.yaml",
    ]
    # Each job ran the whole pipeline in its own run dir, on its own sweep point, and trained
    # with it: the logged loss of every step is (1 - kd_ratio) * ce + kd_ratio * kd, so pure
    # CE (kd_ratio 0) and pure KD (kd_ratio 1) tell apart a job that ignored its point.
    for job, kd_ratio in (("0", 0.0), ("1", 1.0)):
        report = json.loads((sweep / job / "report.json").read_text())
        assert report["config"]["loss"]["kd_ratio"] == kd_ratio
        assert (sweep / job / "final" / "model.safetensors").is_file()
        lines = (sweep / job / "metrics.jsonl").read_text().splitlines()
        steps = [r for r in map(json.loads, lines) if r["kind"] == "train"]
        assert len(steps) == 4
        for r in steps:
            want = (1 - kd_ratio) * r["ce"] + kd_ratio * r["kd"]
            assert r["loss"] == pytest.approx(want, rel=1e-5), (job, r)
            if kd_ratio == 1.0:  # both parts computed, and apart: the loss is not the CE
                assert abs(r["ce"] - r["kd"]) > 1e-3 and r["ce"] > 0, r
            else:  # pure CE: no divergence computed at all, so the loss is not the KD
                assert r["kd"] == 0.0 and r["loss"] > 0, r
    # Both jobs shared one cache_dir and built it at once: one tokenized corpus for both.
    assert len(list((tmp_path / "cache" / "data").iterdir())) == 1

    out = subprocess.run(
        [sys.executable, str(REPO / "scripts/report.py"), str(sweep)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    frontier = json.loads((sweep / "frontier.json").read_text())
    assert frontier["failed"] == []
    assert {p["run"] for p in frontier["points"]} == {"0", "1"}
