"""Width pruning by measured activation importance (Minitron's one-shot recipe).

A depth cut removes whole layers; a width cut keeps every kept layer but narrows it:

* **MLP channels**: channel ``j`` of a layer scores the mean ``|act(gate_j) * up_j|`` over
  the calibration tokens, i.e. the magnitude of what ``down_proj`` reads from it.
* **Attention heads**, in whole key/value groups so the GQA layout stays valid: a query head
  scores the mean L2 norm of its output (the slice of ``o_proj``'s input it writes); a group
  scores the sum over the query heads that share its key/value head.
* **Hidden channels** (the residual stream, shared by every layer, the embedding and the
  tied head): channel ``c`` scores the mean ``|x_c|`` of every normalised block input (each
  layer's norms) and of the final norm's output: what the projections read.

The cut is uniform per layer (every layer keeps the same count, each its own best channels),
so the student is a standard config of the teacher's architecture that ``from_pretrained``,
torchao and the GGUF export take as they are. ``head_dim`` is written out, since a cut hidden
size no longer equals ``heads * head_dim``. Kept units are stored in index order (not
importance order), so a cut that keeps everything reproduces the teacher exactly, and what
was kept is recorded in ``config.distill_kept_channels``.

Removing hidden channels changes each RMSNorm's mean over the channels it sees; that is the
approximation Minitron makes too, recovered by distillation. Gemma's embedding scale
(``sqrt(hidden_size)``) follows the new size; its tied head makes a compensating rescale of
the embedding table rescale the logits as well, so none is applied.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from distill import metrics
from distill.models.load import ModelError
from distill.models.student import decoder_layers, model_from_state, num_layers_of

log = logging.getLogger(__name__)

# The student config attribute recording which channels each cut kept (teacher indices).
KEPT_CHANNELS_ATTR = "distill_kept_channels"
# Architectures whose layout width pruning knows and tests (transformers' model_type; Gemma 3
# is its text model). GPT-2 fuses q/k/v into one Conv1D and ties its head size to n_embd /
# n_head: not supported.
WIDTH_ARCHS = ("llama", "qwen2", "qwen3", "gemma2", "gemma3_text")
# Norms whose output is a normalised block input (hidden-channel importance is read there).
_BLOCK_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm")


@dataclass(frozen=True)
class Width:
    """A width to cut to; None keeps the teacher's."""

    intermediate_size: int | None = None
    num_key_value_heads: int | None = None
    hidden_size: int | None = None

    def cuts(self) -> bool:
        return any(
            v is not None
            for v in (self.intermediate_size, self.num_key_value_heads, self.hidden_size)
        )


@dataclass(frozen=True)
class Importance:
    """Per-layer MLP channel and key/value group scores, and hidden channel scores."""

    mlp: list[Tensor]  # (intermediate_size,) per layer
    kv_groups: list[Tensor]  # (num_key_value_heads,) per layer
    hidden: Tensor  # (hidden_size,)


def head_layout(config: Any) -> tuple[int, int, int]:
    """``(query heads, key/value heads, head_dim)`` of a decoder config."""
    n_heads = int(config.num_attention_heads)
    n_kv = int(getattr(config, "num_key_value_heads", None) or n_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // n_heads)
    return n_heads, n_kv, head_dim


def width_problems(config: Any, width: Width) -> list[str]:
    """What is wrong with cutting a model of ``config`` to ``width`` (empty: nothing)."""
    if not width.cuts():
        return []
    arch = str(getattr(config, "model_type", "?"))
    if arch not in WIDTH_ARCHS:
        return [
            f"width pruning (pair.student.intermediate_size / num_key_value_heads / "
            f"hidden_size) supports {', '.join(WIDTH_ARCHS)}, not {arch}: cut depth only "
            "(pair.student.layers or num_layers)"
        ]
    _, n_kv, _ = head_layout(config)
    limits = {
        "intermediate_size": int(config.intermediate_size),
        "num_key_value_heads": n_kv,
        "hidden_size": int(config.hidden_size),
    }
    out = []
    for key, limit in limits.items():
        value = getattr(width, key)
        if value is not None and not 1 <= value <= limit:
            out.append(f"pair.student.{key}={value}: the teacher has {limit}; give 1..{limit}")
    return out


def check_width(config: Any, width: Width) -> None:
    """Raises:
    ModelError: every problem :func:`width_problems` finds, in one message."""
    problems = width_problems(config, width)
    if problems:
        raise ModelError("; ".join(problems))


def width_config(config: Any, width: Width) -> Any:
    """A copy of ``config`` describing the model cut to ``width`` (head_dim written out)."""
    check_width(config, width)
    new = copy.deepcopy(config)
    n_heads, n_kv, head_dim = head_layout(config)
    new.head_dim = head_dim
    if width.intermediate_size is not None:
        new.intermediate_size = width.intermediate_size
    if width.num_key_value_heads is not None:
        new.num_key_value_heads = width.num_key_value_heads
        new.num_attention_heads = width.num_key_value_heads * (n_heads // n_kv)
    if width.hidden_size is not None:
        new.hidden_size = width.hidden_size
    return new


def _mlp_and_attn(layer: nn.Module) -> tuple[nn.Module, nn.Module]:
    mlp, attn = getattr(layer, "mlp", None), getattr(layer, "self_attn", None)
    if mlp is None or attn is None or not hasattr(mlp, "down_proj"):
        raise ModelError(f"{type(layer).__name__} has no mlp.down_proj / self_attn to cut")
    return mlp, attn


@contextmanager
def _hooks(model: PreTrainedModel, sums: dict[str, Any]) -> Iterator[None]:
    """Forward hooks adding each layer's channel magnitudes into ``sums``."""
    _, layers = decoder_layers(model)
    n_heads, _, head_dim = head_layout(model.config)
    handles = []

    def add(key: Any, value: Tensor) -> None:
        sums[key] = sums.get(key, 0) + value.double()

    def on_down(i: int) -> Any:  # the input of down_proj: act(gate) * up
        return lambda module, args: add(("mlp", i), args[0].detach().abs().sum((0, 1)))

    def on_o(i: int) -> Any:  # the input of o_proj: the heads' outputs side by side
        def hook(module: nn.Module, args: Any) -> None:
            x = args[0].detach()
            heads = x.reshape(*x.shape[:-1], n_heads, head_dim).norm(dim=-1)
            add(("heads", i), heads.sum((0, 1)))

        return hook

    def on_norm(module: nn.Module, args: Any, output: Any) -> None:
        add("hidden", output.detach().abs().sum((0, 1)))

    for i, layer in enumerate(layers):
        mlp, attn = _mlp_and_attn(layer)
        handles.append(mlp.down_proj.register_forward_pre_hook(on_down(i)))
        handles.append(attn.o_proj.register_forward_pre_hook(on_o(i)))
        for name in _BLOCK_NORMS:
            if (norm := getattr(layer, name, None)) is not None:
                handles.append(norm.register_forward_hook(on_norm))
    final = getattr(model.get_decoder(), "norm", None)
    if final is not None:
        handles.append(final.register_forward_hook(on_norm))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def measure_importance(model: PreTrainedModel, blocks: Tensor, batch_size: int) -> Importance:
    """Channel, group and hidden importance of ``model`` on ``blocks`` ``(N, T)``.

    Raises:
        ModelError: the architecture has no layout width pruning knows, or ``blocks`` is
            not a batch of token ids.
    """
    if (problem := metrics.blocks_problem(blocks, batch_size)) is not None:
        raise ModelError(f"width calibration: {problem}")
    sums: dict[Any, Tensor] = {}
    with metrics.eval_mode(model), _hooks(model, sums):
        for batch in metrics.batches_of(blocks, batch_size):
            model(input_ids=batch.to(metrics.model_device(model)), use_cache=False)
    n_heads, n_kv, _ = head_layout(model.config)
    n_layers = num_layers_of(model.config)
    groups = [sums[("heads", i)].reshape(n_kv, n_heads // n_kv).sum(-1) for i in range(n_layers)]
    return Importance(
        mlp=[sums[("mlp", i)] for i in range(n_layers)],
        kv_groups=groups,
        hidden=sums["hidden"],
    )


def top_indices(scores: Tensor, k: int) -> list[int]:
    """The ``k`` highest-scoring indices, in index order (ties go to the lower index)."""
    order = sorted(range(len(scores)), key=lambda j: (-float(scores[j]), j))
    return sorted(order[:k])


@dataclass(frozen=True)
class Kept:
    """Teacher indices each cut keeps: per layer MLP channels and kv groups; hidden."""

    mlp: list[list[int]]
    kv_groups: list[list[int]]
    hidden: list[int]

    def as_dict(self) -> dict[str, Any]:
        return {"intermediate": self.mlp, "kv_groups": self.kv_groups, "hidden": self.hidden}


def choose_kept(config: Any, width: Width, importance: Importance) -> Kept:
    """The units to keep at ``width``: each layer's best, by ``importance``."""
    _, n_kv, _ = head_layout(config)
    mlp_k = width.intermediate_size or int(config.intermediate_size)
    kv_k = width.num_key_value_heads or n_kv
    hidden_k = width.hidden_size or int(config.hidden_size)
    return Kept(
        mlp=[top_indices(s, mlp_k) for s in importance.mlp],
        kv_groups=[top_indices(s, kv_k) for s in importance.kv_groups],
        hidden=top_indices(importance.hidden, hidden_k),
    )


def _rows(kv_groups: list[int], per_group: int, head_dim: int) -> Tensor:
    """Row indices of the heads of ``kv_groups`` (``per_group`` heads each) in a projection."""
    heads = [g * per_group + h for g in kv_groups for h in range(per_group)]
    return torch.tensor([h * head_dim + d for h in heads for d in range(head_dim)])


def _slice_layer_tensor(
    suffix: str, value: Tensor, mlp: Tensor, q_rows: Tensor, kv_rows: Tensor, hidden: Tensor
) -> Tensor:
    """One decoder-layer tensor cut to the kept units (``suffix`` after ``layers.N.``)."""
    name = suffix.rsplit(".", 1)[0].rsplit(".", 1)[-1]  # gate_proj, q_norm, input_layernorm
    weight = suffix.endswith(".weight")
    if name in ("gate_proj", "up_proj"):
        return value[mlp][:, hidden] if weight else value[mlp]
    if name == "down_proj":
        return value[hidden][:, mlp] if weight else value[hidden]
    if name == "q_proj":
        return value[q_rows][:, hidden] if weight else value[q_rows]
    if name in ("k_proj", "v_proj"):
        return value[kv_rows][:, hidden] if weight else value[kv_rows]
    if name == "o_proj":
        return value[hidden][:, q_rows] if weight else value[hidden]
    if name in ("q_norm", "k_norm"):  # over head_dim, which is kept whole
        return value
    if name.endswith("layernorm") and value.dim() == 1:
        return value[hidden]
    raise ModelError(f"width pruning does not know the layer tensor {suffix!r}")


def cut_state(model: PreTrainedModel, kept: Kept) -> dict[str, Tensor]:
    """``model``'s state dict with every tensor cut to ``kept``."""
    prefix, _ = decoder_layers(model)
    n_heads, n_kv, head_dim = head_layout(model.config)
    per_group = n_heads // n_kv
    hidden = torch.tensor(kept.hidden)
    d = int(model.config.hidden_size)
    out: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        if key.startswith(prefix + "."):
            index, suffix = key[len(prefix) + 1 :].split(".", 1)
            i = int(index)
            out[key] = _slice_layer_tensor(
                suffix,
                value,
                torch.tensor(kept.mlp[i]),
                _rows(kept.kv_groups[i], per_group, head_dim),
                _rows(kept.kv_groups[i], 1, head_dim),
                hidden,
            ).clone()
        elif value.dim() == 2 and value.shape[1] == d:  # embedding, head
            out[key] = value[:, hidden].clone()
        elif value.dim() == 1 and value.shape[0] == d:  # final norm
            out[key] = value[hidden].clone()
        else:
            raise ModelError(f"width pruning does not know the tensor {key!r} {tuple(value.shape)}")
    return out


def prune_width(
    model: PreTrainedModel, width: Width, blocks: Tensor, *, batch_size: int = 4
) -> PreTrainedModel:
    """``model`` cut to ``width`` by importance measured on ``blocks``: a fresh model of its
    class with a standard config, what was kept recorded in ``config.distill_kept_channels``.

    Raises:
        ModelError: an unsupported architecture, a width beyond the model's, or a tensor the
            cut does not know.
    """
    check_width(model.config, width)
    importance = measure_importance(model, blocks, batch_size)
    kept = choose_kept(model.config, width, importance)
    config = width_config(model.config, width)
    setattr(config, KEPT_CHANNELS_ATTR, kept.as_dict())
    student = model_from_state(config, cut_state(model, kept))
    log.info(
        "student: width cut to MLP %d, %d kv groups, hidden %d",
        int(config.intermediate_size),
        head_layout(config)[1],
        int(config.hidden_size),
    )
    return student


def kept_hidden(config: Any) -> list[int] | None:
    """The teacher's hidden channels a width-cut student kept; None when none were cut."""
    kept = getattr(config, KEPT_CHANNELS_ATTR, None)
    return None if not kept else list(kept["hidden"])
