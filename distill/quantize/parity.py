"""Parity of every saved artifact: reload it where it deploys and compare its logits.

After the quantize stage writes a variant it is loaded back in the runtime a user runs it in
and its logits on a few fixed held-out blocks are compared with two references the stage
holds in memory:

* **torchao / cast folders** are reloaded by a child Python process that runs
  :data:`CHILD_CODE`: plain ``transformers`` (and ``torchao`` underneath), no ``distill``
  import, exactly what a user of the published folder runs. The one exception is a folder that
  stores GPT-2's Conv1D as Linear, which only :func:`distill.models.conv1d.load_causal_lm`
  loads; the child then imports that module and nothing else of distill.
* **GGUF files** are loaded by llama.cpp (:mod:`distill.models.llama_cpp`, in this process),
  the runtime they are written for, and the ids its tokenizer gives a held-out text must equal
  the source tokenizer's. Without llama-cpp-python the record says ``not checked: <reason>``
  and the stage goes on.

The references:

* the **in-memory model the artifact was written from** (the torchao-quantized model, the
  cast bf16/fp16 model, or for GGUF the float model carrying the file's dequantized weights):
  ``max_abs_logit_diff``, ``kl_to_in_memory``, ``top1_to_in_memory`` and the two
  perplexities. A transformers reload must compute what was held in memory, so its limits are
  tight (:data:`FOLDER_LIMITS`); llama.cpp quantizes activations inside its quantized dot
  products and runs F16 matmuls in half precision, so its limits are per GGUF type and
  measured (:data:`LLAMA_CPP_LIMITS`);
* the **float student** it was quantized from: ``kl_to_float`` and ``ppl_ratio_to_float``,
  the quantization error itself, with a ceiling per method (:data:`MAX_KL_TO_FLOAT`) that
  only a broken artifact (wrong scales, a lost tie, a mis-permuted head) exceeds.

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

from distill.errors import DistillError
from distill.metrics import ce_sum, perplexity_from, score_logits
from distill.names import LLAMA_QUANT_TYPES

log = logging.getLogger(__name__)

# Held-out blocks every artifact is checked on (the first ones of the validation split).
PARITY_BLOCKS = 2

# Reload fidelity of a folder (transformers reload vs the in-memory model it was written from).
# The same tensors through the same kernels give identical logits; the margin covers
# threading-order differences in float accumulation.
FOLDER_LIMITS: dict[str, float] = {
    "max_abs_logit_diff": 1e-2,
    "kl_to_in_memory": 1e-4,
    "min_top1_to_in_memory": 0.99,
}

# llama.cpp vs the in-memory model, per GGUF type, on the 2 x 256-token parity blocks.
# Measured with llama-cpp-python 0.3.36 on 2 threads (max |dlogit|, KL, top-1):
#   F16: default student (14 layers) 0.084, 1.5e-6, 100%; SmolLM2-135M teacher 0.057, 2.6e-6,
#     100%; tiny test llamas ~2e-4. ggml runs F16 matmuls on fp16-rounded activations.
#   Q8_0: student 1.00, 0.0028, 96.1%; teacher 2.70, 0.0041, 96.7%; the untrained student_init
#     1.50, 0.0060, 93.3%. Q4_0: student 0.93, 0.0029, 96.3%; student_init 1.27, 0.0061,
#     91.6%. Q4_1: student_init 1.20, 0.0059, 92.9%. ggml multiplies Q8_0/Q4_x weights with
#     activations quantized to 8 bits per block of 32, so every matmul adds a small error.
#   Control: the SmolLM2 Q4_1 file written by llama.cpp's own converter, against transformers
#     on its dequantized weights, gives 2.24, 0.0040, 96.3%: the same size, so it is the
#     runtime, not our writer.
# A broken file (a mis-permuted head, a wrong scale, a misread tensor) is off by nats of KL
# (tests/quantize/test_parity_llama_cpp.py corrupts a tensor). The limits sit 5x above the
# worst KL measured, 3x above the worst max |dlogit|; top-1 is loose (near-ties of an
# untrained student flip).
_QUANTIZED_GGUF_LIMITS = {
    "max_abs_logit_diff": 8.0,
    "kl_to_in_memory": 0.03,
    "min_top1_to_in_memory": 0.8,
}
LLAMA_CPP_LIMITS: dict[str, dict[str, float]] = {
    "gguf-f16": {
        "max_abs_logit_diff": 0.5,
        "kl_to_in_memory": 1e-3,
        "min_top1_to_in_memory": 0.95,
    },
    "gguf-q8_0": _QUANTIZED_GGUF_LIMITS,
    "gguf-q4_1": _QUANTIZED_GGUF_LIMITS,
    "gguf-q4_0": _QUANTIZED_GGUF_LIMITS,
    # The types llama.cpp's quantizer makes run through the same quantized dot products.
    **{f"gguf-{t}": _QUANTIZED_GGUF_LIMITS for t in LLAMA_QUANT_TYPES},
}

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
    # llama.cpp-made types: 4-6 bits share Q4_0's ceiling, 2-3 bits get a looser one (the
    # default student's figures: docs/quantization.md).
    **{f"gguf-{t}": 3.0 for t in LLAMA_QUANT_TYPES if t[1] in "456" or t.startswith("iq4")},
    **{f"gguf-{t}": 6.0 for t in LLAMA_QUANT_TYPES if t[1] in "23"},
}


class ParityError(DistillError):
    """A saved artifact does not reproduce the model it was written from."""


@dataclass
class Artifact:
    """One saved variant to check: a model folder, or a GGUF file inside ``folder``."""

    name: str
    folder: Path
    gguf_file: str | None = None
    device: str = "cpu"

    @property
    def path(self) -> Path:
        return self.folder / self.gguf_file if self.gguf_file else self.folder


# The child: plain transformers only. argv[1] is a JSON manifest written by reload_logits.
CHILD_CODE = r"""
import json, sys
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

manifest = json.loads(open(sys.argv[1]).read())
ids = load_file(manifest["blocks"])["ids"]
allowed = set()
for a in manifest["artifacts"]:
    kwargs = {"use_safetensors": True}
    if a["device"] != "cpu":
        kwargs["device_map"] = a["device"]
    config = json.loads(open(a["folder"] + "/config.json").read())
    if config.get("distill_conv1d_as_linear"):
        # GPT-2 Conv1D stored as Linear: the one loader from_pretrained cannot replace
        # (distill/models/conv1d.py imports nothing else from distill; its packages'
        # __init__ files, distill and distill.models, load with it, and the latter's
        # name table, distill.exports).
        from distill.models.conv1d import load_causal_lm
        allowed = {"distill", "distill.exports", "distill.models", "distill.models.conv1d"}
        model = load_causal_lm(a["folder"], **kwargs).eval()
    else:
        model = AutoModelForCausalLM.from_pretrained(a["folder"], **kwargs).eval()
    # One block at a time, as the in-memory reference was computed (quantize/stage.py's
    # _logits; this child may not import distill): CPU kernels pick their path by the number
    # of rows (on AMX Xeons int8 weight-only at 512 rows differed from 256 rows by 0.8 in a
    # logit), so the same shapes are what make the comparison exact.
    with torch.inference_mode():
        logits = torch.cat([
            model(input_ids=ids[i : i + 1].to(model.device), use_cache=False).logits.float().cpu()
            for i in range(ids.shape[0])
        ])
    save_file({"logits": logits}, a["out"])
    del model, logits
used = [k for k in sys.modules if k == "distill" or k.startswith("distill.")]
assert set(used) <= allowed, f"imported {used}"
"""


def reload_logits(
    artifacts: Sequence[Artifact],
    ids: torch.Tensor,
    workdir: Path,
    *,
    timeout_s: float = 1800,
) -> dict[str, dict[str, torch.Tensor]]:
    """Logits of every model folder on ``ids`` ``(B, T)``, from one fresh process.

    One child loads the folders one after the other (each freed before the next), which
    saves a Python + torch start per folder; none of them is ever in the parent.

    Returns:
        name -> ``{"logits": (B, T, V) fp32}``.

    Raises:
        ParityError: the child failed (its last stderr lines are in the message).
        ValueError: an artifact is a GGUF file (llama.cpp checks those:
            :func:`llama_cpp_logits`).
    """
    from safetensors.torch import load_file, save_file

    if any(a.gguf_file for a in artifacts):
        raise ValueError("GGUF files are checked in llama.cpp (llama_cpp_logits), not reloaded")
    # Absolute: the child runs with workdir as its cwd, so a relative run_dir would not resolve.
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    blocks = workdir / "blocks.safetensors"
    save_file({"ids": ids.contiguous()}, str(blocks))
    manifest = {
        "blocks": str(blocks),
        "artifacts": [
            {
                "name": a.name,
                "folder": str(a.folder.resolve()),
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
    # where torchao is installed.
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
        names = ", ".join(str(a.folder) for a in artifacts)
        raise ParityError(f"reloading {names} in a fresh process failed:\n{tail}")
    return {a.name: load_file(str(workdir / f"{a.name}.safetensors")) for a in artifacts}


def llama_cpp_logits(path: Path, ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """llama.cpp's logits ``(B, T, V)`` fp32 of the GGUF file ``path`` on ``ids`` ``(B, T)``.

    Raises:
        LlamaCppError: llama-cpp-python is missing, or llama.cpp cannot load or run the file.
    """
    from distill.models import gguf_logits

    return torch.stack(gguf_logits(path, ids, vocab_size=vocab_size))


def compare(
    reloaded: torch.Tensor,
    in_memory: torch.Tensor,
    float_logits: torch.Tensor,
    ids: torch.Tensor,
) -> dict[str, float]:
    """Parity figures of one artifact; every logits tensor is ``(B, T, V)`` on ``ids`` ``(B, T)``.

    Position ``t`` predicts ``ids[:, t + 1]``: ``T - 1`` positions per block are scored.
    Perplexity, KL and top-1 are :mod:`distill.metrics`' (the evaluate report's).
    """
    # score_logits(model, reference): CE of the first, KL(reference || first).
    to_in_memory = score_logits(reloaded, in_memory, ids)
    to_float = score_logits(reloaded, float_logits, ids)
    ppl_float = perplexity_from(*ce_sum(float_logits, ids))
    diff = reloaded[:, :-1].float() - in_memory[:, :-1].float()
    return {
        "max_abs_logit_diff": float(diff.abs().max()),
        "kl_to_in_memory": to_in_memory.kl,
        "top1_to_in_memory": to_in_memory.top1,
        "ppl_in_memory": perplexity_from(*ce_sum(in_memory, ids)),
        "ppl_reloaded": to_in_memory.perplexity,
        "kl_to_float": to_float.kl,
        "ppl_float": ppl_float,
        "ppl_ratio_to_float": to_in_memory.perplexity / ppl_float,
        "scored_positions": to_in_memory.num_tokens,
    }


def limits_for(artifact: Artifact) -> dict[str, float | None]:
    """The thresholds ``artifact`` is judged by: its runtime's fidelity and its method's
    quantization ceiling (``kl_to_float``; None where the method has none)."""
    fidelity = LLAMA_CPP_LIMITS.get(artifact.name) if artifact.gguf_file else FOLDER_LIMITS
    if fidelity is None:  # a GGUF type added to names.GGUF_TYPES without measured limits
        raise KeyError(f"no llama.cpp parity limits for {artifact.name}: add them to parity.py")
    return {**fidelity, "kl_to_float": MAX_KL_TO_FLOAT.get(artifact.name)}


def failures(figures: dict[str, Any], limits: dict[str, float | None]) -> list[str]:
    """Which of ``limits`` (from :func:`limits_for`) ``figures`` (from :func:`compare`) break,
    as readable phrases; a NaN figure breaks its limit."""
    out = []
    if not figures["max_abs_logit_diff"] <= limits["max_abs_logit_diff"]:
        out.append(
            f"max |logit - in-memory logit| = {figures['max_abs_logit_diff']:.3g} > "
            f"{limits['max_abs_logit_diff']}"
        )
    if not figures["kl_to_in_memory"] <= limits["kl_to_in_memory"]:
        out.append(
            f"KL to the in-memory model = {figures['kl_to_in_memory']:.3g} > "
            f"{limits['kl_to_in_memory']}"
        )
    if not figures["top1_to_in_memory"] >= limits["min_top1_to_in_memory"]:
        out.append(
            f"top-1 agreement with the in-memory model = {figures['top1_to_in_memory']:.3f} < "
            f"{limits['min_top1_to_in_memory']}"
        )
    ceiling = limits.get("kl_to_float")
    if ceiling is not None and not figures["kl_to_float"] <= ceiling:
        out.append(f"KL to the float student = {figures['kl_to_float']:.3g} > {ceiling}")
    if figures.get("tokenizer_ids_match") is False:
        out.append("the embedded tokenizer encodes held-out text differently from the source")
    return out


def _gguf_figures(
    a: Artifact,
    ref: torch.Tensor,
    float_logits: torch.Tensor,
    ids: torch.Tensor,
    text: str | None,
    source_token_ids: list[int] | None,
) -> dict[str, Any]:
    """A GGUF file's parity figures in llama.cpp, or ``not_checked`` when it is missing.

    Raises:
        LlamaCppError: llama.cpp is installed but cannot load or run the file.
    """
    from distill.models import default_threads, gguf_tokenize, llama_cpp_problem

    problem = llama_cpp_problem()
    if problem:
        return {"passed": None, "not_checked": f"not checked: {problem}", "checked_in": None}
    figures: dict[str, Any] = compare(
        llama_cpp_logits(a.path, ids, ref.shape[-1]), ref, float_logits, ids
    )
    if text is not None and source_token_ids is not None:
        figures["tokenizer_ids_match"] = gguf_tokenize(a.path, text) == source_token_ids
    figures["checked_in"] = f"{_runtime()}, in process, {default_threads()} threads"
    return figures


def _runtime() -> str:
    from distill.models import runtime_name

    return runtime_name()


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
    """Check ``artifacts``, add a ``parity`` entry to each matching record, then judge.

    Folders are reloaded by plain transformers in a fresh process, GGUF files by llama.cpp.

    Args:
        records: quantize records (``method`` names the artifact); updated in place.
        in_memory: artifact name -> safetensors file holding ``{"logits": (B, T, V)}`` of
            the in-memory model it was written from.
        float_logits: ``(B, T, V)`` of the float student.
        source_token_ids: the source tokenizer's ids for ``text`` (GGUF tokenizer check).

    Raises:
        ParityError: naming every artifact that failed (or that llama.cpp could not load),
            and why; the records keep their figures so the caller can still write them.
    """
    from safetensors.torch import load_file

    from distill.models import LlamaCppError

    bad = []
    by_name = {r["method"]: r for r in records}
    try:
        folders = [a for a in artifacts if not a.gguf_file]
        reloaded = reload_logits(folders, ids, workdir) if folders else {}
        for a in artifacts:
            ref = load_file(str(in_memory[a.name]))["logits"]
            figures: dict[str, Any]
            if not a.gguf_file:
                figures = compare(reloaded[a.name]["logits"], ref, float_logits, ids)
                figures["checked_in"] = "fresh process, plain transformers (no distill import)"
            else:
                try:
                    figures = _gguf_figures(a, ref, float_logits, ids, text, source_token_ids)
                except LlamaCppError as err:
                    figures = {"passed": False, "error": str(err), "checked_in": _runtime()}
                    bad.append(f"{a.path}: {err}")
            by_name[a.name]["parity"] = figures
            if "max_abs_logit_diff" in figures:
                _judge(a, figures, bad)
            elif figures.get("not_checked"):
                log.warning("parity %s: %s", a.name, figures["not_checked"])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if bad:
        raise ParityError("parity check failed for " + " | ".join(bad))


def _judge(a: Artifact, figures: dict[str, Any], bad: list[str]) -> None:
    """Add the verdict and thresholds to ``figures``, log them, and name ``a`` in ``bad``
    when it fails."""
    limits = limits_for(a)
    problems = failures(figures, limits)
    figures["thresholds"] = limits
    figures["passed"] = not problems
    log.info(
        "parity %s (%s): max|dlogit| %.2e, KL to in-memory %.2e, top-1 %.3f, KL to float "
        "%.4f, ppl x%.4f of float%s",
        a.name,
        figures["checked_in"],
        figures["max_abs_logit_diff"],
        figures["kl_to_in_memory"],
        figures["top1_to_in_memory"],
        figures["kl_to_float"],
        figures["ppl_ratio_to_float"],
        "" if not problems else " FAILED",
    )
    if problems:
        bad.append(f"{a.path}: " + "; ".join(problems))
