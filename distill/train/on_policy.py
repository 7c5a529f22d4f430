"""On-policy distillation (GKD's λ): micro-batches made of the student's own samples.

With ``train.on_policy_fraction`` λ, that share of micro-batches is not trained on the
data's text but on what the student writes after a prompt cut from the block (the first
``train.sample_prompt_tokens`` tokens), scored by the online teacher. The student is then
corrected where its own generations go, not only where the data goes: the train/inference
mismatch (exposure bias) that off-policy KD leaves alone.

Which micro-batches are on-policy is a pure function of ``(train.seed, global micro-batch
index, λ)`` (:func:`is_on_policy`), and each sample is drawn under a seed derived from
``(train.seed, step, micro-batch, rank)`` (:func:`sample_seed`) inside a forked RNG
(:func:`distill.sampling.generate`), so a resumed run samples exactly what the run
without a stop did. The rows (:func:`sampled_rows`) mark prompt tokens and padding as
having no target, so :func:`~distill.train.losses.scored_positions` scores exactly the
sampled tokens, in both loss paths and in the window's token count.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from distill.errors import DistillError
from distill.sampling import generate, pad_id
from distill.train.losses import IGNORE_INDEX


@dataclass(frozen=True)
class SampleSettings:
    """How the student samples: ``prompt_tokens`` of each block as the prompt, then up to
    ``new_tokens`` tokens at ``temperature`` (0: greedy)."""

    prompt_tokens: int
    new_tokens: int
    temperature: float


def check_sampling_supported(distributed_type: Any) -> None:
    """Refuse on-policy sampling where the student's weights are sharded.

    Under FSDP or DeepSpeed ZeRO-3 every forward gathers weights collectively, so all
    processes would have to decode in lockstep; each stops at its own EOS, and the first
    to finish would leave the others waiting forever.

    Raises:
        DistillError: for ``FSDP`` and ``DEEPSPEED``, naming the fix.
    """
    from accelerate.utils import DistributedType

    if distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise DistillError(
            f"train.on_policy_fraction > 0 under {distributed_type}: sampling with sharded "
            "weights needs every process to decode in lockstep, which is not supported: "
            "launch with DDP (a replicated student) or set train.on_policy_fraction=0"
        )


def _uniform(key: str) -> float:
    """A number in ``[0, 1)`` that depends on ``key`` only (not on any RNG state)."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:13], 16) / float(1 << 52)


def is_on_policy(seed: int, micro_index: int, fraction: float) -> bool:
    """Whether global micro-batch ``micro_index`` (``step * grad_accum_steps + k``) is one of
    the student's own samples: true with probability ``fraction``, independently per index;
    always at 1, never at 0. The same on every process, so they sample together."""
    if fraction <= 0.0:
        return False
    if fraction >= 1.0:
        return True
    return _uniform(f"on-policy:{seed}:{micro_index}") < fraction


def sample_seed(seed: int, step: int, micro: int, rank: int) -> int:
    """The sampling seed of micro-batch ``micro`` of ``step`` on process ``rank``."""
    return int(hashlib.sha256(f"sample:{seed}:{step}:{micro}:{rank}".encode()).hexdigest()[:8], 16)


def sampled_rows(
    model: Any, prompts: Tensor, settings: SampleSettings, seed: int
) -> tuple[Tensor, Tensor, Tensor]:
    """The student's samples after ``prompts`` ``(B, P)``, as training rows.

    Generation runs under ``no_grad`` with the KV cache (:func:`distill.sampling.generate`);
    each completion stops after its first EOS. Rows are prompt + completion, right-padded to
    the longest (at most ``P + new_tokens``; shorter when every row stopped early).

    Returns:
        ``input_ids``, ``labels`` and ``attention_mask``, each ``(B, P + S)`` on the prompts'
        device: labels are ``IGNORE_INDEX`` on prompt tokens and padding, so only sampled
        tokens are targets; the mask is 0 on padding only.
    """
    completions = generate(
        model,
        prompts.tolist(),
        max_new_tokens=settings.new_tokens,
        temperature=settings.temperature,
        seed=seed,
        batch_size=prompts.shape[0],
    )
    rows, width = prompts.shape[0], prompts.shape[1]
    total = width + max(len(c) for c in completions)
    # Masked out and last, so any id the embedding holds (the one rule: distill.sampling).
    ids = torch.full((rows, total), pad_id(model), dtype=torch.long)
    labels = torch.full((rows, total), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((rows, total), dtype=torch.long)
    ids[:, :width] = prompts.cpu()
    for r, completion in enumerate(completions):
        end = width + len(completion)
        ids[r, width:end] = torch.tensor(completion, dtype=torch.long)
        labels[r, width:end] = ids[r, width:end]
        mask[r, :end] = 1
    device = prompts.device
    return ids.to(device), labels.to(device), mask.to(device)
