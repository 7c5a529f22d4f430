"""``train.select_checkpoint=best_quantized``: ship the checkpoint that is best *after*
quantization, not the last one.

A later checkpoint can have the lower float perplexity and still quantize worse (weights
grow outliers as training goes on), and the quantized model is what gets deployed. Each
complete checkpoint kept in ``checkpoints/`` is quantized with the first of
``quant.methods`` and scored on held-out blocks; the winner's weights become ``final/``.
Only kept checkpoints compete: raise ``train.keep_last_n_checkpoints`` to consider more.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from distill.config import DistillError, PipelineConfig, cache_root
from distill.train.checkpoint import complete_checkpoints

log = logging.getLogger(__name__)

SELECTION_FILE = "checkpoint_selection.json"


@torch.inference_mode()
def perplexity(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 4) -> float:
    """exp(mean next-token cross-entropy) over ``blocks`` ``(N, T)``, weighted by tokens."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        ids = blocks[i : i + batch_size]
        loss = model(input_ids=ids, labels=ids).loss
        n = ids[:, 1:].numel()
        total += float(loss) * n
        count += n
    return math.exp(total / max(count, 1))


def run(cfg: PipelineConfig, run_dir: Path, val_blocks: torch.Tensor | None = None) -> dict:
    """Score every kept checkpoint's quantized form; copy the best one's weights to final/.

    Raises:
        DistillError: no complete checkpoint, or no quantization method configured.
    """
    from distill.quantize.stage import quantize_folder

    ckpts = complete_checkpoints(run_dir / "checkpoints")
    if not ckpts:
        raise DistillError(
            f"train.select_checkpoint=best_quantized: no complete checkpoint in "
            f"{run_dir / 'checkpoints'}; lower train.save_every_n_steps"
        )
    if not cfg.quant.methods:
        raise DistillError("train.select_checkpoint=best_quantized needs quant.methods")
    method = cfg.quant.methods[0]
    final = run_dir / "final"
    if val_blocks is None:
        from distill.data import prepare_data
        from distill.models.load import load_tokenizer

        tokenizer = load_tokenizer(str(final))
        val_blocks = prepare_data(cfg.data, tokenizer, cache_root(cfg)).val
    if cfg.eval.max_blocks is not None:
        val_blocks = val_blocks[: cfg.eval.max_blocks]

    scores = []
    with tempfile.TemporaryDirectory(prefix="select-", dir=run_dir) as tmp:
        for ckpt in ckpts:
            src = Path(tmp) / f"src-{ckpt.name}"
            src.mkdir()
            for f in ("config.json", "generation_config.json", "model.safetensors"):
                if (ckpt / f).exists():
                    shutil.copy(ckpt / f, src / f)
            dst = Path(tmp) / f"q-{ckpt.name}"
            quantize_folder(
                src,
                dst,
                method,
                include_embeddings=cfg.quant.include_embeddings,
                group_size=cfg.quant.group_size,
                compute_dtype=cfg.quant.compute_dtype,
            )
            model = AutoModelForCausalLM.from_pretrained(str(dst))
            ppl = perplexity(model, val_blocks)
            del model
            scores.append({"checkpoint": ckpt.name, "method": method, "perplexity": ppl})
            log.info("select: %s quantized (%s) perplexity %.3f", ckpt.name, method, ppl)
    best = min(scores, key=lambda s: s["perplexity"])
    chosen = run_dir / "checkpoints" / best["checkpoint"]
    staging = run_dir / f".staging-final-select-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(final, staging)  # tokenizer and generation files stay as trained
    for f in ("config.json", "model.safetensors"):
        shutil.copy(chosen / f, staging / f)
    shutil.rmtree(final)
    os.replace(staging, final)
    result = {"selected": best["checkpoint"], "by": f"perplexity after {method}", "scores": scores}
    (run_dir / SELECTION_FILE).write_text(json.dumps(result, indent=2))
    log.info("select: final/ now holds %s", best["checkpoint"])
    return result
