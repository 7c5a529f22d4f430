"""Models: loading teachers (the run's :class:`Teacher` handle), building students, their
bytes, and llama.cpp as the runtime of GGUF files. The names other stages may use; each is
imported from its module on first use (:mod:`distill.exports`)."""

from distill.exports import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(
    __name__,
    {
        # the teacher handle and loading
        "Teacher": "teacher",
        "load_teacher": "teacher",
        "ModelError": "load",
        "VocabMismatchError": "load",
        "check_model_files": "load",
        "check_source": "load",
        "check_vocab": "load",
        "find_packaged_file": "load",
        "freeze": "load",
        "is_hub_id": "load",
        "load_config": "load",
        "load_tokenizer": "load",
        "packaged_distribution": "load",
        "preflight_pretrained_student": "load",
        # students
        "build_student": "build",
        "planned_config": "build",
        # the budget search's finalists, trained by the train stage
        "Finalists": "shape_search",
        "TEACHER_LAYERS_ATTR": "student",
        "build_student_from_teacher": "student",
        "decoder_layers": "student",
        "num_layers_of": "student",
        "model_from_state": "student",
        # width pruning
        "KEPT_CHANNELS_ATTR": "width",
        "Width": "width",
        "head_layout": "width",
        "kept_hidden": "width",
        "measure_importance": "width",
        "prune_width": "width",
        "width_config": "width",
        # saved folders (GPT-2's Conv1D stored as Linear loads with load_causal_lm)
        "CONFIG_KEY": "conv1d",
        "conv1d_to_linear": "conv1d",
        "load_causal_lm": "conv1d",
        # bytes
        "disk_bytes": "footprint",
        "param_count": "footprint",
        "tensor_bytes": "footprint",
        "weight_bytes": "footprint",
        "weights_hash": "footprint",
        # llama.cpp
        "LLAMA_CPP_REQUIREMENT": "llama_cpp",
        "LlamaCppError": "llama_cpp",
        "LlamaRuntime": "llama_cpp",
        "default_threads": "llama_cpp",
        "gguf_logits": "llama_cpp",
        "gguf_tokenize": "llama_cpp",
        "llama_cpp_problem": "llama_cpp",
        "load_llama": "llama_cpp",
        "open_gguf": "llama_cpp",
        "quiet_llama_log": "llama_cpp",
        "runtime_name": "llama_cpp",
    },
)
