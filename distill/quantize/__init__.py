"""Post-training quantization: torchao folders, GGUF files, parity checks, the teacher's GGUF
reference. The names other stages may use, each imported from its module on first use
(:mod:`distill.exports`)."""

from distill.exports import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "run": "stage",
        "finished": "stage",
        "calibrate": "stage",
        "calibration_group_sizes": "stage",
        "quantize_variant": "stage",
        "QuantizeError": "torchao",
        "ParityError": "parity",
        "GGUFExportError": "gguf",
        "check_exportable": "gguf",
        "tokenizer_metadata": "gguf",
        "TEACHER_GGUF": "teacher_gguf",
    },
)
