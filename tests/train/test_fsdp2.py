"""FSDP2 checkpoints: exact resume of sharded weights and optimizer state.

What runs where (found on this project's CPU machine, accelerate 1.15, torch 2.13 CPU):
torch's ``fully_shard`` runs over gloo with 2 CPU processes, so the checkpoint code is
tested here on shards made by ``fully_shard`` directly. accelerate's FSDP plugin does not:
with ``distributed_type: FSDP`` and ``Accelerator(cpu=True)`` the launch becomes MULTI_CPU
(DDP, the plugin dropped without a word), and with ``cpu=False`` and no CUDA every process
is an independent ``DistributedType.NO`` run; accelerate only enables FSDP on an
accelerator-backed distributed type. The whole loop under ``accelerate launch`` with
configs/accelerate/fsdp.yaml is therefore the ``gpu`` test below.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, tiny_overrides


def _run(cmd: list[str], timeout: int = 300) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout + proc.stderr


def test_fsdp2_checkpoint_resumes_exactly_on_two_gloo_processes(tmp_path: Path) -> None:
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    worker = str(REPO / "tests/train/fsdp2_resume_worker.py")
    _run([torchrun, "--nproc_per_node", "2", "--master_port", "29531", worker, str(tmp_path)])
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["restored_step"] == 4
    assert report["keys_equal"] and report["num_optimizer_tensors"] > 0
    assert report["mismatched"] == []  # torch.equal on every weight and optimizer tensor
    assert report["losses_equal"]
    assert report["optimizer_keyed_by_name"]
    # The gathered checkpoint is an ordinary folder: whole tensors, loadable without FSDP.
    (ckpt,) = (tmp_path / "checkpoints").iterdir()
    weights = load_file(str(ckpt / "model.safetensors"))
    assert weights["model.embed_tokens.weight"].shape == (64, 32)


def _fsdp_launch(tmp_path: Path, run: str, args: list[str]) -> str:
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    return _run(
        [
            accelerate,
            "launch",
            "--config_file",
            str(REPO / "configs/accelerate/fsdp.yaml"),
            "--num_processes",
            "2",
            str(REPO / "scripts/distill.py"),
            *args,
            "train.batch_size=1",
            "train.teacher_placement=shard",
            f"hydra.run.dir={tmp_path}/{run}",
        ],
        timeout=600,
    )


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_fsdp2_loop_resumes_exactly_under_accelerate(
    tmp_path: Path, tiny_teacher_dir: Path, tiny_corpus_dir: Path
) -> None:
    """configs/accelerate/fsdp.yaml on 2 GPUs, teacher sharded: 4 steps straight equal the
    same run resumed from its step-2 checkpoint (fp32, so equality is exact)."""
    args = tiny_overrides(tiny_teacher_dir, tiny_corpus_dir, tmp_path / "cache")
    args += ["train.mixed_precision=no", "train.keep_last_n_checkpoints=2"]
    out = _fsdp_launch(tmp_path, "straight", args)
    assert "accelerate: FSDP, 2 process(es)" in out
    # The same run as if killed after its step-2 checkpoint: no final/, no step 4.
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed/final")
    shutil.rmtree(tmp_path / "resumed/checkpoints/step-000004")
    out = _fsdp_launch(tmp_path, "resumed", [*args, "train.resume=auto"])
    assert "at step 2" in out
    a = load_file(str(tmp_path / "straight/final/model.safetensors"))
    b = load_file(str(tmp_path / "resumed/final/model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
