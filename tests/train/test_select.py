"""train.select_checkpoint=best_quantized ships the checkpoint best after quantization.

Expected winners are known by construction, and expected scores are computed here with plain
torch on the quantize stage's own output, never with the code under test.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from distill.config import to_pipeline_config
from distill.data import PackedSplits
from distill.models.conv1d import load_causal_lm
from distill.train import loop as train
from distill.train import select_checkpoint as select
from distill.train.checkpoint import MARKER, step_dir_name
from tests.conftest import compose, tiny_llama, tiny_overrides


def _cfg(teacher_dir: Path, corpus_dir: Path, cache: Path, extra: list[str]):
    return to_pipeline_config(compose(tiny_overrides(teacher_dir, corpus_dir, cache) + extra))


def _save_checkpoint(run_dir: Path, step: int, model) -> Path:
    """A complete checkpoint folder as the loop leaves it (the model files are what count)."""
    folder = run_dir / "checkpoints" / step_dir_name(step)
    model.save_pretrained(str(folder))
    (folder / MARKER).write_text("ok\n")
    return folder


def _plain_perplexity(model, blocks: torch.Tensor) -> float:
    """exp(mean next-token cross-entropy) over ``blocks`` (N, T), straight from the logits."""
    with torch.inference_mode():
        logits = model(input_ids=blocks).logits.float()
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), blocks[:, 1:].reshape(-1))
    return math.exp(float(ce))


@pytest.mark.parametrize("good_step", [2, 4])
def test_best_quantized_checkpoint_becomes_final(
    tmp_path: Path, tokenizer, tiny_teacher_dir, tiny_corpus_dir, good_step: int
) -> None:
    cfg = _cfg(
        tiny_teacher_dir, tiny_corpus_dir, tmp_path / "cache", ["quant.methods=[int8_weight_only]"]
    )
    run_dir = tmp_path / "run"
    good = tiny_llama(len(tokenizer), seed=1)
    # The same model with 50x sharper logits: confidently wrong on every token, so its
    # perplexity is far above the near-uniform good model's (about the vocabulary size),
    # before int8 quantization and after it.
    bad = tiny_llama(len(tokenizer), seed=1)
    with torch.no_grad():
        bad.model.norm.weight.mul_(50.0)
    bad_step = 6 - good_step
    _save_checkpoint(run_dir, good_step, good)
    _save_checkpoint(run_dir, bad_step, bad)
    bad.save_pretrained(str(run_dir / "final"))  # what training left: not the winner here
    tokenizer.save_pretrained(str(run_dir / "final"))
    val = torch.randint(0, len(tokenizer), (2, 16), generator=torch.Generator().manual_seed(0))

    result = select.run(cfg, run_dir, splits=PackedSplits(train=val, val=val))

    winner = step_dir_name(good_step)
    assert result["selected"] == winner
    scores = {s["checkpoint"]: s["perplexity"] for s in result["scores"]}
    assert set(scores) == {winner, step_dir_name(bad_step)}
    assert scores[winner] < len(tokenizer) * 1.5 < scores[step_dir_name(bad_step)]
    expected = load_file(str(run_dir / "checkpoints" / winner / "model.safetensors"))
    final = load_file(str(run_dir / "final" / "model.safetensors"))
    assert expected.keys() == final.keys()
    assert all(torch.equal(expected[k], final[k]) for k in expected)
    assert (run_dir / "final" / "tokenizer.json").exists()
    saved = json.loads((run_dir / select.SELECTION_FILE).read_text())
    assert saved == json.loads(json.dumps(result))
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith((".staging-", ".old-"))]


def test_train_stage_applies_select_checkpoint(
    tmp_path: Path, tiny_teacher_dir, tiny_corpus_dir
) -> None:
    """scripts/distill.py runs only the train stage: the selection must happen inside it."""
    cfg = _cfg(
        tiny_teacher_dir,
        tiny_corpus_dir,
        tmp_path / "cache",
        ["train.select_checkpoint=best_quantized", "quant.methods=[int8_weight_only]"],
    )
    run_dir = tmp_path / "run"
    train.run(cfg, run_dir)
    saved = json.loads((run_dir / select.SELECTION_FILE).read_text())
    assert {s["checkpoint"] for s in saved["scores"]} == {"step-000002", "step-000004"}
    chosen = load_file(str(run_dir / "checkpoints" / saved["selected"] / "model.safetensors"))
    final = load_file(str(run_dir / "final" / "model.safetensors"))
    assert all(torch.equal(chosen[k], final[k]) for k in chosen)


def test_a_rerun_makes_a_selection_a_crash_interrupted(
    tmp_path: Path, tiny_teacher_dir, tiny_corpus_dir
) -> None:
    """final/ written, then a crash before the selection: the rerun selects, not trains."""
    cfg = _cfg(
        tiny_teacher_dir,
        tiny_corpus_dir,
        tmp_path / "cache",
        ["train.select_checkpoint=best_quantized", "quant.methods=[int8_weight_only]"],
    )
    run_dir = tmp_path / "run"
    train.run(cfg, run_dir)
    (run_dir / select.SELECTION_FILE).unlink()  # as if the process died before writing it
    rows = (run_dir / "metrics.jsonl").read_text()
    train.run(cfg, run_dir)
    assert (run_dir / "metrics.jsonl").read_text() == rows  # no step ran again
    saved = json.loads((run_dir / select.SELECTION_FILE).read_text())
    chosen = load_file(str(run_dir / "checkpoints" / saved["selected"] / "model.safetensors"))
    final = load_file(str(run_dir / "final" / "model.safetensors"))
    assert all(torch.equal(chosen[k], final[k]) for k in chosen)


def test_selection_quantizes_as_the_stage_ships(
    tmp_path: Path, tokenizer, tiny_teacher_dir, tiny_corpus_dir
) -> None:
    """GPTQ int4 with 8-bit embeddings in bf16: the checkpoint is scored as it will ship."""
    from distill.caches import cache_root
    from distill.data import prepare_data
    from distill.quantize import stage as quantize

    cfg = _cfg(
        tiny_teacher_dir,
        tiny_corpus_dir,
        tmp_path / "cache",
        [
            "quant.methods=[int4_weight_only]",
            "quant.gguf=[]",
            "quant.calibration=gptq",
            "quant.calibration_blocks=4",
            "quant.embedding_bits=8",
            "quant.compute_dtype=bfloat16",
        ],
    )
    run_dir = tmp_path / "run"
    ckpt = _save_checkpoint(run_dir, 2, tiny_llama(len(tokenizer), seed=3))
    tiny_llama(len(tokenizer), seed=4).save_pretrained(str(run_dir / "final"))
    tokenizer.save_pretrained(str(run_dir / "final"))

    result = select.run(cfg, run_dir)  # blocks from the run's data, as in a real run
    quantize.run(cfg, run_dir)  # final/ now holds the checkpoint: the variant that ships
    shipped = load_causal_lm(run_dir / "quantized" / "int4_weight_only")
    record = json.loads((run_dir / "quantized" / "quantize.json").read_text())[0]
    assert record["calibration"] == "gptq" and record["embedding_bits"] == 8
    splits = prepare_data(cfg.data, tokenizer, cache_root(cfg))
    val = splits.val[: cfg.eval.max_blocks]
    assert result["scores"][0]["perplexity"] == pytest.approx(
        _plain_perplexity(shipped, val), rel=1e-5
    )

    selected = select.quantize_checkpoint(cfg, ckpt, tmp_path / "sel", splits.train)
    with torch.inference_mode():
        torch.testing.assert_close(
            selected(input_ids=val).logits, shipped(input_ids=val).logits, atol=0, rtol=0
        )
