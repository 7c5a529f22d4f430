"""Student construction from a teacher: cutting its layers, or a config of its architecture.

Which layers a ``num_layers`` student keeps is decided above this module
(:mod:`distill.models.build`, by the search of :mod:`distill.models.layer_cache`).

Works for any ``AutoModelForCausalLM`` architecture: decoder blocks are found as the
``nn.ModuleList`` whose length is the config's layer count, wherever the architecture keeps
it (``model.layers`` for llama, ``transformer.h`` for GPT-2).
"""

from __future__ import annotations

import copy
import logging
import re
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from distill.models.load import ModelError

log = logging.getLogger(__name__)


# The student config attribute listing, for each student layer, the teacher layer it copies.
TEACHER_LAYERS_ATTR = "distill_teacher_layers"


def num_layers_of(config: Any) -> int:
    # GPT-2 maps num_hidden_layers onto n_layer through attribute_map, so this covers it.
    return int(config.num_hidden_layers)


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The qualified name and the ``nn.ModuleList`` of decoder blocks.

    Raises:
        ModelError: no unique ModuleList of the config's layer count exists.
    """
    n = num_layers_of(model.config)
    found = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == n and name
    ]
    if len(found) != 1:
        names = [name for name, _ in found]
        raise ModelError(
            f"cannot find the decoder blocks of {type(model).__name__}: expected one ModuleList "
            f"of {n} layers, found {names or 'none'}; use pair.student.init=from_config"
        )
    return found[0]


def check_layers(layers: list[int], num_teacher_layers: int) -> None:
    """Fail on a layer list the teacher cannot supply, naming both depth keys and the fix.

    Raises:
        ModelError: an index is outside ``0 .. num_teacher_layers - 1``.
    """
    bad = [i for i in layers if not 0 <= i < num_teacher_layers]
    if bad:
        raise ModelError(
            f"pair.student.layers has {bad} outside the teacher's {num_teacher_layers} layers "
            f"(0..{num_teacher_layers - 1}): list layers of this teacher, or give "
            "pair.student.num_layers=N alone on the command line to choose N of them by "
            "greedy search"
        )


def check_num_layers(num_layers: int, num_teacher_layers: int) -> None:
    """Fail on a depth the teacher cannot supply, naming both depth keys.

    Raises:
        ModelError: ``num_layers`` is not in ``1 .. num_teacher_layers``.
    """
    if not 1 <= num_layers <= num_teacher_layers:
        raise ModelError(
            f"pair.student.num_layers={num_layers}: the teacher has {num_teacher_layers} layers; "
            f"give at most {num_teacher_layers}, or pair.student.layers=[...] of its layers"
        )


def subset_config(config: Any, layers: list[int]) -> Any:
    """A copy of ``config`` describing a model that keeps only ``layers``."""
    new = copy.deepcopy(config)
    new.num_hidden_layers = len(layers)
    # Per-layer attributes (sliding/full attention patterns) follow the kept layers.
    for attr in ("layer_types",):
        values = getattr(config, attr, None)
        if isinstance(values, (list, tuple)) and len(values) == num_layers_of(config):
            setattr(new, attr, [values[i] for i in layers])
    return new


def build_student_from_teacher(teacher: PreTrainedModel, layers: list[int]) -> PreTrainedModel:
    """A student of the teacher's class holding copies of the teacher's ``layers``.

    The model is constructed fresh from a reduced config (so per-layer indices such as
    attention ``layer_idx`` for the KV cache are right) and the teacher's tensors are copied
    in with layer ``layers[i]`` renamed to ``i``. The mapping is recorded as
    ``config.distill_teacher_layers`` (saved in config.json), so hidden-state matching can
    pair student layer ``i`` with teacher layer ``layers[i]``.

    Raises:
        ModelError: an index is outside the teacher's layers.
    """
    check_layers(layers, num_layers_of(teacher.config))
    prefix, _ = decoder_layers(teacher)
    config = subset_config(teacher.config, layers)
    setattr(config, TEACHER_LAYERS_ATTR, list(layers))
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.*)$")
    source = teacher.state_dict()
    new_index = {old: new for new, old in enumerate(layers)}
    mapped: dict[str, torch.Tensor] = {}
    for key, value in source.items():
        m = pattern.match(key)
        if m is None:
            mapped[key] = value
        elif int(m.group(1)) in new_index:
            mapped[f"{prefix}.{new_index[int(m.group(1))]}.{m.group(2)}"] = value
    return model_from_state(config, mapped)


def model_from_state(config: Any, state: dict[str, torch.Tensor]) -> PreTrainedModel:
    """A fresh fp32 model of ``config`` holding ``state`` (every tensor it has, the tied
    head aside), in eval mode like ``from_pretrained`` (the loop switches to train()).

    Raises:
        ModelError: ``state`` lacks a tensor the model has, or has one it lacks.
    """
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied heads appear under both names or only one depending on the architecture.
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied and "lm_head" not in k]
    if missing or unexpected:
        raise ModelError(
            f"weight copy mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.to(torch.float32)
    return model.eval()


def config_with_overrides(teacher_config: Any, overrides: dict[str, Any]) -> Any:
    """A copy of the teacher's config with ``overrides`` applied (the from_config student).

    Raises:
        ModelError: an override names a key the config does not have.
    """
    config = copy.deepcopy(teacher_config)
    unknown = [k for k in overrides if not hasattr(config, k)]
    if unknown:
        raise ModelError(
            f"pair.student.config_overrides has keys {unknown} that {type(config).__name__} "
            "does not have"
        )
    for key, value in overrides.items():
        setattr(config, key, value)
    if "num_hidden_layers" in overrides and getattr(config, "layer_types", None) is not None:
        config.layer_types = list(config.layer_types)[: config.num_hidden_layers]
    return config


def build_student_from_config(teacher_config: Any, overrides: dict[str, Any]) -> PreTrainedModel:
    """A randomly initialised model from the teacher's config with ``overrides`` applied.

    Raises:
        ModelError: an override names a key the config does not have.
    """
    config = config_with_overrides(teacher_config, overrides)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
