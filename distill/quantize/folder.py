"""One quantized (or cast) Hugging Face folder: quantize, write, reload, record.

torchao variants are ordinary Hugging Face folders: ``config.json`` records a
``TorchAoConfig`` and ``model.safetensors`` holds torchao's flattened tensors, so plain
``AutoModelForCausalLM.from_pretrained(folder)`` reloads them (torchao installed, no
``distill``).

Why the weights are quantized here and written by hand instead of through
``from_pretrained(src, quantization_config=TorchAoConfig(...))`` + ``save_pretrained``
(transformers 5.23):

* transformers' on-load quantizer calls ``quantize_`` with torchao's default ``_is_linear``
  filter, so ``include_input_output_embeddings=True`` alone leaves ``nn.Embedding`` in float;
* with tied embeddings, ``save_pretrained`` looks for aliases among the *flattened* names
  (``lm_head._weight_qdata``), which its tied-key patterns (``lm_head.weight``) do not match,
  so it writes the table twice, and the reload then fails in ``tie_weights`` because
  ``torch.equal`` is not implemented for torchao tensors.

Here only the first name of each alias group is written (:mod:`distill.quantize.plan` keeps
one tensor per group); transformers re-ties the others on load from ``tie_word_embeddings``.

``from_pretrained`` would rebuild GPT-2's Conv1D modules, which the plan rewrote as Linear, so
such a folder lists the rewritten modules in ``config.json`` and loads with
:func:`distill.models.conv1d.load_causal_lm` (transformers + torchao + safetensors underneath);
the parity check reloads it that way in its fresh process, and the quantize record says
``loader: distill.models.conv1d.load_causal_lm``.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill.models import load_causal_lm, weight_bytes
from distill.quantize.gptq import Int4Groups
from distill.quantize.plan import QuantPlan, is_tied, quantize_model
from distill.quantize.records import FolderFacts, folder_record
from distill.quantize.torchao import (
    AO_CONFIGS,
    QuantizeError,
    cast_weights,
    check_method,
    default_device,
)
from distill.run_dir import replace_folder, staging_folder

# Weight files are rewritten; every other plain file in the source folder (tokenizer,
# generation config, chat template, README) is copied unchanged.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def _is_side_file(f: Path) -> bool:
    """A plain file of the source folder that is copied as it is (not weights, not an index)."""
    return f.is_file() and not f.name.endswith(_WEIGHT_SUFFIXES) and f.name not in _WEIGHT_INDEXES


def _unique_state_dict(model: nn.Module, plan: QuantPlan) -> dict[str, torch.Tensor]:
    """The state dict without alias entries: safetensors cannot store one tensor twice."""
    state = model.state_dict()
    for alias in plan.aliases:
        state.pop(f"{alias}.weight", None)
    return state


def _write_torchao_folder(
    model: nn.Module, plan: QuantPlan, src: Path, staging: Path, quant_config: Any
) -> None:
    """Write config, flattened safetensors and the source's non-weight files to ``staging``."""
    from safetensors.torch import save_file
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    staging.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        if _is_side_file(f) and f.name != "config.json":
            shutil.copy2(f, staging / f.name)
    tensors, metadata = flatten_tensor_state_dict(_unique_state_dict(model, plan))
    # transformers reads "format" to pick the framework, and the torchao keys to rebuild
    # the int8 tensors on load.
    metadata["format"] = "pt"
    save_file(
        {k: v.contiguous() for k, v in tensors.items()}, staging / "model.safetensors", metadata
    )
    model.config.quantization_config = quant_config
    model.config.save_pretrained(staging)


def _write(
    model: nn.Module,
    plan: QuantPlan,
    ao_config: Any,
    src: Path,
    dst: Path,
    include_embeddings: bool,
) -> None:
    """Build the folder in a staging sibling of ``dst``, then swap it into place whole."""
    from transformers import TorchAoConfig

    staging = staging_folder(dst)
    try:
        if ao_config is None:  # a cast: save_pretrained writes plain float safetensors
            model.save_pretrained(str(staging))
            for f in sorted(src.iterdir()):
                if _is_side_file(f) and not (staging / f.name).exists():
                    shutil.copy2(f, staging / f.name)
        else:
            quant_config = TorchAoConfig(
                ao_config,
                modules_to_not_convert=[s["name"] for s in plan.skipped] or None,
                include_input_output_embeddings=include_embeddings,
            )
            _write_torchao_folder(model, plan, src, staging, quant_config)
        replace_folder(staging, dst)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _reloaded_facts(dst: Path, device: str, plan: QuantPlan, was_tied: bool) -> tuple[int, bool]:
    """Reload ``dst`` as a user would: its weight bytes and whether embedding and head are tied.

    Raises:
        QuantizeError: an alias or the embedding/head tie came back as a separate tensor.
    """
    load_kwargs: dict[str, Any] = {"device_map": device} if device != "cpu" else {}
    reloaded = load_causal_lm(dst, **load_kwargs)
    for alias, owner in plan.aliases.items():
        if reloaded.get_submodule(alias).weight is not reloaded.get_submodule(owner).weight:
            raise QuantizeError(
                f"{dst}: {alias} no longer shares {owner}'s weight after reload; the tie would "
                "store it twice. Check tie_word_embeddings in the source config.json"
            )
    tied = is_tied(reloaded)
    if was_tied and not tied:
        raise QuantizeError(f"{dst}: input embedding and LM head came back untied")
    return weight_bytes(reloaded), tied


def _place(model: nn.Module, method: str, device: str, compute_dtype: str) -> None:
    """Move and cast the float model (loaded with ``dtype="auto"``, so scales come out in its
    own precision unless cast here) to where and in what dtype ``method`` computes."""
    if device == "cuda":
        # tinygemm's int4 kernel takes bf16 activations and scales; config.dtype follows, so
        # the reload computes in bf16 too.
        model.to("cuda")
        cast_weights(model, torch.bfloat16)
    elif method in AO_CONFIGS and compute_dtype == "bfloat16":
        cast_weights(model, torch.bfloat16)


def quantize_to_folder(
    src: Path,
    dst: Path,
    method: str,
    *,
    include_embeddings: bool,
    group_size: int = 32,
    device: str | None = None,
    calibrated: dict[str, Int4Groups] | None = None,
    embedding_bits: int = 8,
    compute_dtype: str = "float32",
) -> tuple[dict, nn.Module]:
    """Quantize the causal LM in ``src`` and write a folder plain transformers reloads.

    The folder is built in a staging sibling of ``dst``, swapped into place, then reloaded to
    measure what a user gets.

    Args:
        src: Hugging Face model folder (config, safetensors, tokenizer files).
        dst: output folder; replaced if it exists.
        method: one of ``distill.names.QUANT_METHODS``.
        include_embeddings: also quantize the input embedding and the (tied) LM head.
        group_size: values per scale for ``int4_weight_only``.
        device: where to quantize; default CUDA for int4 when available (packed layout, that
            folder then reloads on CUDA only), else CPU.
        calibrated: CPU ``int4_weight_only``: GPTQ groups per Linear name (others are RTN).
        embedding_bits: CPU ``int4_weight_only``: 8 stores the embedding as int8 per row.
        compute_dtype: ``"bfloat16"``: a CPU torchao variant's float tensors are cast first,
            so it computes and reloads in bf16 (``quant.compute_dtype``); ``"float32"``: not.

    Returns:
        The quantize.json record (:func:`distill.quantize.records.folder_record`) and the
        in-memory model the folder was written from.

    Raises:
        QuantizeError: unknown method, ``src`` is not a model folder, or the reloaded model
            lost a weight tie (which would store a tied weight twice).
    """
    from transformers import AutoModelForCausalLM

    check_method(method)
    src, dst = Path(src), Path(dst)
    if not (src / "config.json").is_file():
        raise QuantizeError(f"{src} has no config.json: give a Hugging Face model folder")
    device = device or default_device(method)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(src, dtype="auto").eval()
    float_bytes = weight_bytes(model)
    params = sum(p.numel() for p in model.parameters())
    was_tied = is_tied(model)
    _place(model, method, device, compute_dtype)
    plan, ao_config = quantize_model(
        model,
        method,
        include_embeddings=include_embeddings,
        group_size=group_size,
        device=device,
        calibrated=calibrated,
        embedding_bits=embedding_bits,
    )
    _write(model, plan, ao_config, src, dst, include_embeddings)
    q_bytes, tied = _reloaded_facts(dst, device, plan, was_tied)
    record = folder_record(
        method,
        src,
        dst,
        model=model,
        plan=plan,
        ao_config=ao_config,
        device=device,
        settings={
            "group_size": group_size,
            "calibrated": bool(calibrated),
            "embedding_bits": embedding_bits,
            "include_embeddings": include_embeddings,
        },
        facts=FolderFacts(params, float_bytes, q_bytes, tied),
        seconds=time.perf_counter() - start,
    )
    return record, model


def quantize_folder(
    src: Path,
    dst: Path,
    method: str,
    *,
    include_embeddings: bool,
    group_size: int = 32,
    device: str | None = None,
    compute_dtype: str = "float32",
) -> dict:
    """:func:`quantize_to_folder` without calibration, returning only the record.

    Raises:
        QuantizeError: as :func:`quantize_to_folder`.
    """
    record, _ = quantize_to_folder(
        src,
        dst,
        method,
        include_embeddings=include_embeddings,
        group_size=group_size,
        device=device,
        compute_dtype=compute_dtype,
    )
    return record
