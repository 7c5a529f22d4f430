"""Parity of every saved artifact: reload it in a fresh process and compare its logits.

After the quantize stage writes a variant (a torchao folder or a GGUF file) it is reloaded by
a child Python process that runs :data:`CHILD_CODE`: plain ``transformers`` (and ``torchao``
or ``gguf`` underneath), no ``distill`` import, exactly what a user of the published folder
runs. The one exception is a folder that stores GPT-2's Conv1D as Linear, which only
:func:`distill.models.conv1d.load_causal_lm` loads; the child then imports that module and nothing
else of distill. The child writes its logits on a few fixed held-out blocks; the parent
compares them with two references it holds in memory:

* the **in-memory model the artifact was written from** (the torchao-quantized model, the
  cast bf16/fp16 model, or for GGUF the float model carrying the file's dequantized weights):
  ``max_abs_logit_diff``, ``kl_to_in_memory`` and the two perplexities. Saving and reloading
  must not change what the model computes, so these thresholds are tight for every method;
* the **float student** it was quantized from: ``kl_to_float`` and ``ppl_ratio_to_float``,
  the quantization error itself, with a ceiling per method (:data:`MAX_KL_TO_FLOAT`) that
  only a broken artifact (wrong scales, a lost tie, a mis-permuted head) exceeds.

For GGUF files the child also loads the embedded tokenizer (``AutoTokenizer`` with
``gguf_file=``) and the ids it gives a held-out text must equal the source tokenizer's.

KL is KL(reference || artifact) in nats, averaged over the scored next-token positions;
perplexity is exp of the mean next-token cross-entropy on the same positions.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distill.config import DistillError
from distill.evaluate.metrics import ce_sum, perplexity_from, score_logits

log = logging.getLogger(__name__)

# Held-out blocks every artifact is checked on (the first ones of the validation split).
PARITY_BLOCKS = 2

# Reload fidelity (artifact vs the in-memory model it was written from), every method.
# The same tensors through the same kernels give identical logits; the margin covers
# threading-order differences in float accumulation.
MAX_KL_TO_IN_MEMORY = 1e-4
MAX_ABS_LOGIT_DIFF = 1e-2

# Quantization error ceiling (artifact vs the float student), per method, in nats/position.
# The bugs a reload cannot show (a scale on the wrong axis, a group misaligned) send the
# KL to several nats. The ceilings sit 1.8-5x above the worst case measured here, an
# untrained student cut from SmolLM2 (perplexity ~1e4, so small weight changes move its
# extreme logits a lot): bf16 0.004, int8 0.025, q8_0 0.010, int8_dynamic 0.18, 4-bit
# 1.2-1.7 nats. On the 30-layer teacher they are 0.001, 0.006, 0.001, 0.06 and 0.06-0.45.
MAX_KL_TO_FLOAT: dict[str, float] = {
    "bf16": 0.02,
    "fp16": 0.02,
    "int8_weight_only": 0.1,
    "int8_dynamic": 0.5,
    "int4_weight_only": 3.0,
    "gguf-f16": 0.02,
    "gguf-q8_0": 0.1,
    "gguf-q4_1": 3.0,
    "gguf-q4_0": 3.0,
}


class ParityError(DistillError):
    """A saved artifact does not reproduce the model it was written from."""


@dataclass
class Artifact:
    """One saved variant to reload: a model folder, or a GGUF file inside ``folder``."""

    name: str
    folder: Path
    gguf_file: str | None = None
    device: str = "cpu"


# The child: plain transformers only. argv[1] is a JSON manifest written by reload_logits.
CHILD_CODE = r"""
import json, sys
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

manifest = json.loads(open(sys.argv[1]).read())
ids = load_file(manifest["blocks"])["ids"]
allowed = set()
for a in manifest["artifacts"]:
    kwargs = {"gguf_file": a["gguf_file"]} if a["gguf_file"] else {"use_safetensors": True}
    if a["device"] != "cpu":
        kwargs["device_map"] = a["device"]
    config = {} if a["gguf_file"] else json.loads(open(a["folder"] + "/config.json").read())
    if config.get("distill_conv1d_as_linear"):
        # GPT-2 Conv1D stored as Linear: the one loader from_pretrained cannot replace
        # (distill/models/conv1d.py imports nothing else from distill; its packages'
        # __init__ files, distill and distill.models, load with it).
        from distill.models.conv1d import load_causal_lm
        allowed = {"distill", "distill.models", "distill.models.conv1d"}
        model = load_causal_lm(a["folder"], **kwargs).eval()
    else:
        model = AutoModelForCausalLM.from_pretrained(a["folder"], **kwargs).eval()
    with torch.inference_mode():
        logits = model(input_ids=ids.to(model.device), use_cache=False).logits
    out = {"logits": logits.float().cpu().contiguous()}
    if a["gguf_file"] and manifest.get("text"):
        tok = AutoTokenizer.from_pretrained(a["folder"], gguf_file=a["gguf_file"])
        out["token_ids"] = torch.tensor(tok(manifest["text"])["input_ids"], dtype=torch.long)
    save_file(out, a["out"])
    del model, logits
used = [k for k in sys.modules if k == "distill" or k.startswith("distill.")]
assert set(used) <= allowed, f"imported {used}"
"""


def reload_logits(
    artifacts: Sequence[Artifact],
    ids: torch.Tensor,
    workdir: Path,
    *,
    text: str | None = None,
    timeout_s: float = 1800,
) -> dict[str, dict[str, torch.Tensor]]:
    """Logits ``(B, T, V)`` of every artifact on ``ids`` ``(B, T)``, from one fresh process.

    One child loads the artifacts one after the other (each freed before the next), which
    saves a Python + torch start per artifact; none of them is ever in the parent.

    Returns:
        name -> ``{"logits": (B, T, V) fp32}`` plus ``"token_ids"`` ``(L,)`` for GGUF files
        when ``text`` is given.

    Raises:
        ParityError: the child failed (its last stderr lines are in the message).
    """
    from safetensors.torch import load_file, save_file

    workdir.mkdir(parents=True, exist_ok=True)
    blocks = workdir / "blocks.safetensors"
    save_file({"ids": ids.contiguous()}, str(blocks))
    manifest = {
        "blocks": str(blocks),
        "text": text,
        "artifacts": [
            {
                "name": a.name,
                "folder": str(a.folder),
                "gguf_file": a.gguf_file,
                "device": a.device,
                "out": str(workdir / f"{a.name}.safetensors"),
            }
            for a in artifacts
        ],
    }
    manifest_path = workdir / "manifest.json"
    manifest_path.write_text(json.dumps(manifest, indent=2))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    # Run from the work folder (the child's sys.path[0]), where no distill module lies; the
    # child asserts at its end that nothing imported distill. PYTHONPATH is kept: it may be
    # where torchao or gguf are installed.
    proc = subprocess.run(
        [sys.executable, "-c", CHILD_CODE, str(manifest_path)],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=env,
        cwd=workdir,
    )
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-6:])
        names = ", ".join(str(a.folder / (a.gguf_file or "")) for a in artifacts)
        raise ParityError(f"reloading {names} in a fresh process failed:\n{tail}")
    return {a.name: load_file(str(workdir / f"{a.name}.safetensors")) for a in artifacts}


def compare(
    reloaded: torch.Tensor,
    in_memory: torch.Tensor,
    float_logits: torch.Tensor,
    ids: torch.Tensor,
) -> dict[str, float]:
    """Parity figures of one artifact; every logits tensor is ``(B, T, V)`` on ``ids`` ``(B, T)``.

    Position ``t`` predicts ``ids[:, t + 1]``: ``T - 1`` positions per block are scored.
    Perplexity and KL are :mod:`distill.evaluate.metrics`' (the evaluate report's figures).
    """
    # score_logits(model, reference): CE of the first, KL(reference || first).
    to_in_memory = score_logits(reloaded, in_memory, ids)
    to_float = score_logits(reloaded, float_logits, ids)
    ppl_float = perplexity_from(*ce_sum(float_logits, ids))
    diff = reloaded[:, :-1].float() - in_memory[:, :-1].float()
    return {
        "max_abs_logit_diff": float(diff.abs().max()),
        "kl_to_in_memory": to_in_memory.kl,
        "ppl_in_memory": perplexity_from(*ce_sum(in_memory, ids)),
        "ppl_reloaded": to_in_memory.perplexity,
        "kl_to_float": to_float.kl,
        "ppl_float": ppl_float,
        "ppl_ratio_to_float": to_in_memory.perplexity / ppl_float,
        "scored_positions": to_in_memory.num_tokens,
    }


def failures(method: str, figures: dict[str, Any]) -> list[str]:
    """Which thresholds ``figures`` (from :func:`compare`) break, as readable phrases."""
    out = []
    if not figures["max_abs_logit_diff"] <= MAX_ABS_LOGIT_DIFF:
        out.append(
            f"max |logit - in-memory logit| = {figures['max_abs_logit_diff']:.3g} > "
            f"{MAX_ABS_LOGIT_DIFF}"
        )
    if not figures["kl_to_in_memory"] <= MAX_KL_TO_IN_MEMORY:
        out.append(
            f"KL to the in-memory model = {figures['kl_to_in_memory']:.3g} > {MAX_KL_TO_IN_MEMORY}"
        )
    ceiling = MAX_KL_TO_FLOAT.get(method)
    if ceiling is not None and not figures["kl_to_float"] <= ceiling:
        out.append(f"KL to the float student = {figures['kl_to_float']:.3g} > {ceiling}")
    if figures.get("tokenizer_ids_match") is False:
        out.append("the embedded tokenizer encodes held-out text differently from the source")
    return out


def check_artifacts(
    records: Sequence[dict[str, Any]],
    artifacts: Sequence[Artifact],
    in_memory: dict[str, Path],
    float_logits: torch.Tensor,
    ids: torch.Tensor,
    workdir: Path,
    *,
    text: str | None = None,
    source_token_ids: list[int] | None = None,
) -> None:
    """Reload ``artifacts``, add a ``parity`` entry to each matching record, then judge.

    Args:
        records: quantize records (``method`` names the artifact); updated in place.
        in_memory: artifact name -> safetensors file holding ``{"logits": (B, T, V)}`` of
            the in-memory model it was written from.
        float_logits: ``(B, T, V)`` of the float student.
        source_token_ids: the source tokenizer's ids for ``text`` (GGUF tokenizer check).

    Raises:
        ParityError: naming every artifact that failed, and why; the records keep their
            figures so the caller can still write them.
    """
    from safetensors.torch import load_file

    try:
        reloaded = reload_logits(artifacts, ids, workdir, text=text)
        bad = []
        by_name = {r["method"]: r for r in records}
        for a in artifacts:
            ref = load_file(str(in_memory[a.name]))["logits"]
            figures: dict[str, Any] = compare(reloaded[a.name]["logits"], ref, float_logits, ids)
            if "token_ids" in reloaded[a.name] and source_token_ids is not None:
                figures["tokenizer_ids_match"] = (
                    reloaded[a.name]["token_ids"].tolist() == source_token_ids
                )
            problems = failures(a.name, figures)
            figures["thresholds"] = {
                "max_abs_logit_diff": MAX_ABS_LOGIT_DIFF,
                "kl_to_in_memory": MAX_KL_TO_IN_MEMORY,
                "kl_to_float": MAX_KL_TO_FLOAT.get(a.name),
            }
            figures["passed"] = not problems
            figures["checked_in"] = "fresh process, plain transformers (no distill import)"
            by_name[a.name]["parity"] = figures
            where = a.folder / a.gguf_file if a.gguf_file else a.folder
            log.info(
                "parity %s: max|dlogit| %.2e, KL to in-memory %.2e, KL to float %.4f, "
                "ppl x%.4f of float%s",
                a.name,
                figures["max_abs_logit_diff"],
                figures["kl_to_in_memory"],
                figures["kl_to_float"],
                figures["ppl_ratio_to_float"],
                "" if not problems else " FAILED",
            )
            if problems:
                bad.append(f"{where}: " + "; ".join(problems))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if bad:
        raise ParityError("parity check failed for " + " | ".join(bad))
