"""``train.select_checkpoint=best_quantized``: ship the checkpoint that is best *after*
quantization, not the last one.

A later checkpoint can have the lower float perplexity and still quantize worse (weights
grow outliers as training goes on), and the quantized model is what gets deployed. Each
complete checkpoint kept in ``checkpoints/`` is quantized with the first of
``quant.methods`` exactly as the quantize stage will ship it (GPTQ calibration, embedding
bits, group size and compute dtype: :func:`distill.quantize.quantize_variant`) and
scored on held-out blocks; the winner's weights become ``final/``. Only kept checkpoints
compete: raise ``train.keep_last_n_checkpoints`` to consider more.

The train stage runs this at its end (:func:`distill.train.loop.run`), so ``scripts/distill.py``
and ``scripts/pipeline.py`` both honour ``train.select_checkpoint``.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from distill.config import PipelineConfig
from distill.data import PackedSplits, splits_for
from distill.errors import DistillError
from distill.metrics import perplexity
from distill.models import load_tokenizer
from distill.run_dir import RunDir, replace_folder, staging_folder, write_json_atomic
from distill.train.checkpoint import complete_checkpoints

log = logging.getLogger(__name__)

SELECTION_FILE = "checkpoint_selection.json"
# What a checkpoint contributes to a model folder; tokenizer files come from final/.
_MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors")


def run(cfg: PipelineConfig, run_dir: Path, splits: PackedSplits | None = None) -> dict:
    """Score every kept checkpoint's quantized form; copy the best one's weights to final/.

    Args:
        splits: the run's corpus splits (prepared here when None): the first
            ``eval.max_blocks`` validation blocks are scored, the training blocks calibrate
            GPTQ.

    Returns:
        ``{"selected": checkpoint name, "by": ..., "scores": [{"checkpoint", "method",
        "perplexity"}]}``, also written to ``<run_dir>/checkpoint_selection.json``.

    Raises:
        DistillError: no complete checkpoint, or no quantization method configured.
    """
    rd = RunDir(Path(run_dir))
    ckpts = complete_checkpoints(rd.checkpoints)
    if not ckpts:
        raise DistillError(
            f"train.select_checkpoint=best_quantized: no complete checkpoint in "
            f"{rd.checkpoints}; lower train.save_every_n_steps"
        )
    if not cfg.quant.methods:
        raise DistillError("train.select_checkpoint=best_quantized needs quant.methods")
    method = cfg.quant.methods[0]
    splits = splits_for(cfg, load_tokenizer(str(rd.final)), splits)
    val_blocks, calib_blocks = splits.val, splits.train
    if cfg.eval.max_blocks is not None:
        val_blocks = val_blocks[: cfg.eval.max_blocks]

    scores = []
    with tempfile.TemporaryDirectory(prefix="select-", dir=rd.root) as tmp:
        for ckpt in ckpts:
            model = quantize_checkpoint(cfg, ckpt, Path(tmp) / f"q-{ckpt.name}", calib_blocks)
            ppl = perplexity(model, val_blocks, batch_size=4)
            del model
            scores.append({"checkpoint": ckpt.name, "method": method, "perplexity": ppl})
            log.info("select: %s quantized (%s) perplexity %.3f", ckpt.name, method, ppl)
    best = min(scores, key=lambda s: s["perplexity"])
    _install(rd, rd.checkpoints / best["checkpoint"])
    result = {"selected": best["checkpoint"], "by": f"perplexity after {method}", "scores": scores}
    write_json_atomic(rd.root / SELECTION_FILE, result)
    log.info("select: final/ now holds %s", best["checkpoint"])
    return result


def quantize_checkpoint(
    cfg: PipelineConfig, ckpt: Path, dst: Path, calib_blocks: torch.Tensor | None
) -> nn.Module:
    """The first of ``quant.methods`` applied to checkpoint ``ckpt`` as the stage ships it.

    The checkpoint's model files are copied into ``dst/src`` (optimizer and RNG state stay
    out), calibrated and quantized by the quantize stage's own functions into ``dst/q``.

    Returns:
        The in-memory quantized model (what ``dst/q`` reloads to).
    """
    from transformers import AutoModelForCausalLM

    from distill.quantize import calibrate, quantize_variant

    method = cfg.quant.methods[0]
    src = dst / "src"
    src.mkdir(parents=True)
    for f in _MODEL_FILES:
        if (ckpt / f).exists():
            shutil.copy(ckpt / f, src / f)
    # Loaded as the stage loads final/ for its calibration: stored dtype, eval mode.
    float_model = AutoModelForCausalLM.from_pretrained(src, dtype="auto").eval()
    calibrated = calibrate(cfg, float_model, calib_blocks, methods=[method], gguf_types=[])
    del float_model
    _, model = quantize_variant(cfg, src, dst / "q", method, calibrated)
    return model


def _install(rd: RunDir, chosen: Path) -> None:
    """Make ``final/`` hold ``chosen``'s weights, swapped in whole."""
    staging = staging_folder(rd.final)
    shutil.copytree(rd.final, staging)  # tokenizer and generation files stay as trained
    for f in ("config.json", "model.safetensors"):
        shutil.copy(chosen / f, staging / f)
    replace_folder(staging, rd.final)
