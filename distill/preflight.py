"""What a run checks before any model weights load or any training step runs.

A problem found after training costs the whole run (e.g. a GPT-2 teacher with the default
``quant.gguf``, which only the quantize stage used to reject), so everything that follows
from the config, the teacher's ``config.json`` and its tokenizer is checked here: paths and
data files exist and can be read, the teacher's and a pretrained student's weight files are
whole, the student's layers exist in the teacher, a pretrained student shares the teacher's
vocabulary, and every requested output can be written for the student the run will train.
Each failure names the file or key to change and how.
"""

from __future__ import annotations

from typing import Any

from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from distill.config import PipelineConfig, QuantConfig
from distill.data import check_data_inputs
from distill.models import (
    Teacher,
    check_model_files,
    check_source,
    planned_config,
    preflight_pretrained_student,
)


def check_outputs(
    quant: QuantConfig, student_config: Any, tokenizer: PreTrainedTokenizerBase
) -> None:
    """Fail now on a requested output the quantize stage could not write for this student.

    GGUF needs a student llama.cpp computes as transformers does (llama with default or
    ``llama3`` RoPE, qwen2 and qwen3 without a sliding window, gpt2 with the tanh GELU) and a
    byte-level BPE tokenizer (:func:`distill.quantize.check_exportable`,
    :func:`~distill.quantize.tokenizer_metadata`). The torchao methods have no such limit:
    they quantize every ``nn.Linear`` and ``nn.Embedding`` (GPT-2's ``Conv1D`` is rewritten as
    ``Linear`` first) and keep any other module in float, reported in ``quantize.json``.

    Raises:
        GGUFExportError: naming ``quant.gguf`` and the fix (``quant.gguf=[]``).
    """
    if not quant.gguf:
        return
    from distill.models import llama_cpp_problem
    from distill.names import LLAMA_QUANT_TYPES
    from distill.quantize import GGUFExportError, check_exportable, tokenizer_metadata

    made = [t for t in quant.gguf if t in LLAMA_QUANT_TYPES]
    problem = llama_cpp_problem() if made else None
    if problem:  # llama.cpp's quantizer makes them: without it they cannot be written
        raise GGUFExportError(f"quant.gguf={list(quant.gguf)}: {made} need llama.cpp: {problem}")
    try:
        check_exportable(student_config)
        tokenizer_metadata(tokenizer, int(student_config.vocab_size))
    except GGUFExportError as err:
        fix = "" if "quant.gguf=[]" in str(err) else " (set quant.gguf=[] to skip GGUF)"
        raise GGUFExportError(f"quant.gguf={list(quant.gguf)}: {err}{fix}") from None


def preflight(cfg: PipelineConfig, teacher: Teacher) -> None:
    """Checks that need no model weights, run before the teacher loads.

    Reads the teacher's config and tokenizer (a GGUF teacher is checked, then converted here,
    once, as loading it would anyway) and the pretrained student's, never their weights.

    Raises:
        DistillError: a missing path, or an unreadable weight or data file (``ModelError``,
            ``DataError``, each naming the file), layers the teacher lacks, a vocabulary
            mismatch, an output the student cannot be written as (``GGUFExportError``), or
            an lm-eval task lm-eval does not know (``TaskError``); each names the key and the
            fix.
    """
    pair = cfg.pair
    check_source(pair.teacher.name_or_path, "pair.teacher.name_or_path", pair.teacher.gguf_file)
    if pair.student.init == "pretrained":
        assert pair.student.name_or_path is not None
        check_source(pair.student.name_or_path, "pair.student.name_or_path")
    check_data_inputs(cfg.data)
    check_model_files(teacher.source, "teacher")
    tokenizer = teacher.tokenizer
    if pair.student.init == "pretrained":
        assert pair.student.name_or_path is not None
        check_model_files(pair.student.name_or_path, "student")
        preflight_pretrained_student(pair.student, tokenizer, int(teacher.config.vocab_size))
    check_outputs(cfg.quant, planned_config(pair.student, teacher.config), tokenizer)
    if cfg.eval.lm_eval_tasks:  # an unknown task would otherwise fail after training
        from distill.evaluate import check_tasks

        check_tasks(cfg.eval)
