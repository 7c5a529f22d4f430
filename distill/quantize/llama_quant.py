"""GGUF types made by llama.cpp's own quantizer: the k-quant mixes runtimes' users pull.

distill writes F16, Q8_0, Q4_1 and Q4_0 itself (:mod:`distill.quantize.gguf`); every other
type in :data:`distill.names.LLAMA_QUANT_TYPES` (``q4_k_m``, ``q5_k_m``, ``q6_k`` ...) is made
from our F16 file by ``llama_model_quantize``, the function the ``llama-quantize`` tool calls,
reached through the llama-cpp-python binding the pipeline already builds. It picks each
tensor's type for the mix (Q4_K_M keeps half of ``attn_v``/``ffn_down`` at Q6_K ...) and falls
back per tensor where a row is not a whole number of 256-value k-quant blocks (SmolLM2's
hidden size 576 is not): the file's own tensor types are what the record reports.

The importance matrix (``quant.imatrix``) is llama-imatrix's: for every linear layer, the
mean of its input's square per input channel over the calibration blocks, handed to the
quantizer in memory (``llama_model_imatrix_data``), so rounding error is weighted by how much
each channel carries.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from distill.models import LlamaCppError, llama_cpp_problem, quiet_llama_log
from distill.names import LLAMA_QUANT_TYPES
from distill.quantize.gguf_arch import gguf_name, layout

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)


def ftype(gguf_type: str) -> int:
    """llama.cpp's ``LLAMA_FTYPE_MOSTLY_*`` value for ``gguf_type``.

    Raises:
        LlamaCppError: not a llama.cpp-made type, or the binding lacks it (another version).
    """
    import llama_cpp

    if gguf_type not in LLAMA_QUANT_TYPES:
        raise LlamaCppError(f"{gguf_type!r} is not made by llama.cpp: {LLAMA_QUANT_TYPES}")
    value = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{gguf_type.upper()}", None)
    if value is None:
        raise LlamaCppError(
            f"llama-cpp-python {llama_cpp.__version__} names no {gguf_type.upper()}: "
            "`make setup` installs the version distill is written for"
        )
    return int(value)


def importance_matrix(
    model: PreTrainedModel, blocks: torch.Tensor, batch_size: int = 4
) -> dict[str, np.ndarray]:
    """Per GGUF weight name, the mean squared input per input channel of that linear layer
    over ``blocks`` ``(N, T)`` (every position): llama-imatrix's statistic.

    A GPT-2 Conv1D (input along its weight's rows) is measured like a Linear. The LM head is
    left out when tied (the file stores no ``output.weight``; llama.cpp then quantizes the
    embedding as a lookup table)."""
    from transformers.pytorch_utils import Conv1D

    arch = layout(model.config)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []

    def hook(name: str) -> Any:
        def record(module: Any, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]

        return record

    for module_name, module in model.named_modules():
        if not isinstance(module, (torch.nn.Linear, Conv1D)):
            continue
        if module_name == "lm_head" and tied:
            continue
        name = gguf_name(arch, f"{module_name}.weight")
        hooks.append(module.register_forward_pre_hook(hook(name)))
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for i in range(0, blocks.shape[0], batch_size):
                model(input_ids=blocks[i : i + batch_size].to(model.device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return {n: (sums[n] / counts[n]).cpu().numpy().astype(np.float32) for n in sums}


@contextmanager
def _imatrix_array(imatrix: dict[str, np.ndarray] | None) -> Iterator[Any]:
    """``imatrix`` as the NULL-terminated ``llama_model_imatrix_data`` array llama.cpp reads
    (None: no importance matrix); the arrays it points into live for the block."""
    if not imatrix:
        yield None
        return
    import llama_cpp

    kept = [np.ascontiguousarray(v, dtype=np.float32) for v in imatrix.values()]
    names = [n.encode() for n in imatrix]
    entries = (llama_cpp.llama_model_imatrix_data * (len(kept) + 1))()
    for entry, name, values in zip(entries, names, kept, strict=False):
        entry.name = name
        entry.data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        entry.size = values.size
    yield entries  # the last entry stays zeroed: name NULL ends the list


def llama_quantize(
    src: Path,
    dst: Path,
    gguf_type: str,
    *,
    threads: int,
    imatrix: dict[str, np.ndarray] | None = None,
    include_embeddings: bool = True,
) -> None:
    """Write ``dst``: the F16 GGUF ``src`` quantized to ``gguf_type`` by llama.cpp.

    Args:
        include_embeddings: False keeps the token embedding (and so a tied head) F16.

    Raises:
        LlamaCppError: llama-cpp-python is missing or the quantizer fails (its error lines
            in the message).
    """
    problem = llama_cpp_problem()
    if problem:
        raise LlamaCppError(problem)
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype(gguf_type)
    params.nthread = threads
    if not include_embeddings:
        params.token_embedding_type = llama_cpp.GGML_TYPE_F16
    dst.parent.mkdir(parents=True, exist_ok=True)
    with _imatrix_array(imatrix) as entries, quiet_llama_log() as errors:
        if entries is not None:
            params.imatrix = ctypes.cast(
                entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data)
            )
        code = llama_cpp.llama_model_quantize(
            str(src).encode(), str(dst).encode(), ctypes.byref(params)
        )
    if code != 0:
        detail = "; ".join(e for e in errors if e) or f"return code {code}"
        raise LlamaCppError(f"llama.cpp could not quantize {src} to {gguf_type}: {detail}")
