"""The values each enumerated config field accepts: one list per field, read by the schema
(:mod:`distill.config`) and by the code that implements each value, without importing torch."""

from __future__ import annotations

STUDENT_INITS = ("from_teacher", "from_config", "pretrained")
DATA_SOURCES = ("pydoc", "text_files", "hf")
# loss.name: distill/train/losses.py implements each (its DIVERGENCES must list exactly these,
# checked when it is imported).
LOSSES = ("forward_kl", "reverse_kl", "jsd", "tvd", "skew_kl")
# torchao methods (distill/quantize/torchao.py says what each stores on which device) and the
# GGUF tensor types the ``gguf`` package quantizes in numpy (no k-quants there).
QUANT_METHODS = ("bf16", "fp16", "int8_weight_only", "int8_dynamic", "int4_weight_only")
GGUF_TYPES = ("f16", "q8_0", "q4_1", "q4_0")
# GGUF types llama.cpp's own quantizer makes from our F16 file (distill/quantize/llama_quant.py):
# the k-quant mixes runtimes' users pull, and the other types it names that need no importance
# matrix (the IQ1/IQ2/IQ3 types require one to be usable, TQ/MXFP4 fit other models).
LLAMA_QUANT_TYPES = (
    "q2_k",
    "q3_k_s",
    "q3_k_m",
    "q3_k_l",
    "q4_k_s",
    "q4_k_m",
    "q5_k_s",
    "q5_k_m",
    "q6_k",
    "q5_0",
    "q5_1",
    "iq4_nl",
    "iq4_xs",
)
TEACHER_MODES = ("online", "cached")
TEACHER_PLACEMENTS = ("replicate", "shard")
HIDDEN_LOSSES = ("cosine", "mse")
# Fidelity sets eval.fidelity may list (distill/evaluate/fidelity.py); each eval.extra_corpora
# entry adds an "extra:<name>" set besides them.
FIDELITY_SETS = ("teacher_text", "generation", "general")
# The sets each variant answers (the teacher judging the answers): held-out corpus prompts,
# and the teacher's own general questions.
ANSWER_SETS = ("generation", "general")
MIXED_PRECISION = ("no", "bf16", "fp16")
# Grids quantization-aware distillation trains on (distill/train/qad.py implements each).
QAD_GRIDS = ("q4_0", "q8_0")
SELECT_CHECKPOINT = ("last", "best_quantized")
CALIBRATIONS = ("gptq", "none")
COMPUTE_DTYPES = ("float32", "bfloat16")
