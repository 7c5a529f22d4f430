"""Hidden-state matching: the student's output after its layer ``i`` against the teacher's
after the teacher layer that student layer was copied from.

A ``from_teacher`` student records that mapping as ``config.distill_teacher_layers``
(:func:`distill.models.student.build_student_from_teacher`). Forward hooks on the decoder
blocks of both models (:func:`capture_outputs`) keep each matched block's raw output, before
any final norm, during the step's own forwards, so matching costs no extra forward. The
per-position distance (:func:`per_position`) is normalised so its scale does not depend on
the hidden states' norm, which grows with depth; it is masked and reduced with
:func:`~distill.train.losses.reduce_masked` like the logit loss, over the same positions
and token count, then averaged over the matched layers.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.errors import DistillError
from distill.models import TEACHER_LAYERS_ATTR, decoder_layers, kept_hidden, num_layers_of
from distill.train.losses import reduce_masked

if TYPE_CHECKING:
    from distill.config import LossConfig

# Keeps the mse normaliser away from 0 at a (never seen in practice) all-zero teacher state.
_MIN_NORM_SQ = 1e-8


class HiddenStateError(DistillError):
    """Hidden-state matching cannot be set up for this student and teacher."""


@dataclass(frozen=True)
class HiddenMatch:
    """The decoder blocks of student and teacher, the matched ``(student, teacher)`` layer
    index pairs, the distance (``cosine`` or ``mse``), the loss weight and, for a student cut
    in hidden size, the teacher channels its states are compared with."""

    student_layers: nn.ModuleList
    teacher_layers: nn.ModuleList
    pairs: tuple[tuple[int, int], ...]
    kind: str
    weight: float
    # The teacher's hidden channels the student kept (a hidden-size cut); None: all of them.
    teacher_channels: Tensor | None = None

    def teacher_view(self, states: Tensor) -> Tensor:
        if self.teacher_channels is None:
            return states
        return states.index_select(-1, self.teacher_channels.to(states.device))


def layer_pairs(student_config: Any) -> list[tuple[int, int]]:
    """``(student layer, teacher layer)`` for every student layer, from the mapping a
    ``from_teacher`` student records in its config.

    Raises:
        HiddenStateError: the config holds no mapping, or one of the wrong length.
    """
    layers = getattr(student_config, TEACHER_LAYERS_ATTR, None)
    if not layers:
        raise HiddenStateError(
            f"loss.hidden_weight > 0, but the student's config has no {TEACHER_LAYERS_ATTR} "
            "(which teacher layer each student layer copies): build it with "
            "pair.student.init=from_teacher, or set loss.hidden_weight=0"
        )
    if len(layers) != num_layers_of(student_config):
        raise HiddenStateError(
            f"the student's {TEACHER_LAYERS_ATTR}={list(layers)} names {len(layers)} layers, "
            f"but it has {num_layers_of(student_config)}: set loss.hidden_weight=0"
        )
    return [(i, int(t)) for i, t in enumerate(layers)]


def hidden_match(loss_cfg: LossConfig, student: Any, teacher: Any) -> HiddenMatch | None:
    """What the step needs to match hidden states; None when ``loss.hidden_weight`` is 0.

    ``student`` is the unwrapped model (hooks on its blocks also fire inside a DDP/FSDP
    wrapper); ``teacher`` the online one.

    Raises:
        HiddenStateError: no online teacher, no recorded mapping, a mapped teacher layer
            the teacher lacks, or hidden sizes that differ.
    """
    if loss_cfg.hidden_weight == 0.0:
        return None
    if teacher is None:
        raise HiddenStateError(
            "loss.hidden_weight > 0 needs the online teacher's hidden states: set "
            "train.teacher_mode=online or loss.hidden_weight=0"
        )
    pairs = layer_pairs(student.config)
    n_teacher = num_layers_of(teacher.config)
    bad = [t for _, t in pairs if not 0 <= t < n_teacher]
    if bad:
        raise HiddenStateError(
            f"the student copies teacher layers {bad}, but this teacher has {n_teacher}: "
            "distill from the teacher the student was cut from, or set loss.hidden_weight=0"
        )
    d_s, d_t = int(student.config.hidden_size), int(teacher.config.hidden_size)
    # A width-cut student's residual stream is the teacher's kept channels, in index order.
    kept = kept_hidden(student.config)
    channels = None
    if d_s != d_t:
        if kept is None or len(kept) != d_s or max(kept) >= d_t:
            raise HiddenStateError(
                f"hidden sizes differ (student {d_s}, teacher {d_t}) and the student records "
                "no kept teacher channels of that size: states cannot be compared without a "
                "projection; set loss.hidden_weight=0"
            )
        channels = torch.tensor(kept)
    _, s_layers = decoder_layers(student)
    _, t_layers = decoder_layers(teacher)
    return HiddenMatch(
        s_layers, t_layers, tuple(pairs), loss_cfg.hidden_loss, loss_cfg.hidden_weight, channels
    )


@contextmanager
def capture_outputs(layers: nn.ModuleList, indices: Sequence[int]) -> Iterator[dict[int, Tensor]]:
    """While active, every forward through ``layers[i]`` (``i`` in ``indices``) stores that
    block's output ``(B, T, D)`` under ``i`` (the last forward wins); hooks removed on exit."""
    store: dict[int, Tensor] = {}

    def keep(index: int) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            # Llama and GPT-2 blocks return the tensor in transformers 5; older ones a tuple.
            store[index] = output[0] if isinstance(output, (tuple, list)) else output

        return hook

    handles = [layers[i].register_forward_hook(keep(i)) for i in sorted(set(indices))]
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


def per_position(student: Tensor, teacher: Tensor, kind: str) -> Tensor:
    """Distance ``(B, T)`` in float32 between hidden states ``(B, T, D)``: ``cosine`` is
    ``1 - cos(h_s, h_t)``, ``mse`` is ``||h_s - h_t||^2 / ||h_t||^2``; both 0 when equal."""
    s, t = student.float(), teacher.float()
    if kind == "cosine":
        return 1.0 - F.cosine_similarity(s, t, dim=-1)
    if kind == "mse":
        return (s - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp_min(_MIN_NORM_SQ)
    raise ValueError(f"unknown hidden loss {kind!r}: choose cosine or mse")


def hidden_state_loss(
    match: HiddenMatch,
    student_out: dict[int, Tensor],
    teacher_out: dict[int, Tensor],
    valid: Tensor,
    num_tokens: Tensor | float | int,
) -> Tensor:
    """Mean over matched layers of the masked per-position distance.

    Args:
        student_out, teacher_out: block outputs ``(B, T, D)`` by layer index, as
            :func:`capture_outputs` stored them.
        valid: ``(B, T-1)`` the logit loss's scored positions (position ``t`` predicts
            token ``t+1``), so both losses see exactly the same positions.
        num_tokens: the window's token count, as for the logit loss.
    """
    terms = [
        reduce_masked(
            per_position(
                student_out[s][:, :-1],
                match.teacher_view(teacher_out[t][:, :-1]).detach(),
                match.kind,
            ),
            valid,
            num_tokens,
        )
        for s, t in match.pairs
    ]
    return torch.stack(terms).mean()
