"""train.select_checkpoint=best_quantized picks the checkpoint best after quantization."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from distill.config import to_pipeline_config
from distill.train import loop as train
from distill.train import select_checkpoint as select
from tests.conftest import compose, tiny_overrides


def test_best_quantized_checkpoint_becomes_final(
    tmp_path: Path, tiny_teacher_dir, tiny_corpus_dir
) -> None:
    cfg = to_pipeline_config(
        compose(tiny_overrides(tiny_teacher_dir, tiny_corpus_dir, tmp_path / "cache"))
    )
    run_dir = tmp_path / "run"
    train.run(cfg, run_dir)
    val = torch.randint(0, 100, (2, 16))
    result = select.run(cfg, run_dir, val_blocks=val)

    scores = {s["checkpoint"]: s["perplexity"] for s in result["scores"]}
    assert set(scores) == {"step-000002", "step-000004"}
    assert result["selected"] == min(scores, key=scores.get)
    chosen = load_file(str(run_dir / "checkpoints" / result["selected"] / "model.safetensors"))
    final = load_file(str(run_dir / "final" / "model.safetensors"))
    assert all(torch.equal(chosen[k], final[k]) for k in chosen)
    assert (run_dir / "final" / "tokenizer.json").exists()
    saved = json.loads((run_dir / select.SELECTION_FILE).read_text())
    assert saved["selected"] == result["selected"]
