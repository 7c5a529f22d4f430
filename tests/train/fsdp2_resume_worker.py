"""One rank of the FSDP2 exact-resume check (tests/train/test_fsdp2.py), run by ``torchrun``.

A tiny tied llama is sharded with ``fully_shard`` over gloo, as accelerate's FSDP2 plugin
shards the student. Trained 8 steps straight, then 4 steps, checkpointed with
:func:`distill.train.checkpoint.save_checkpoint`, rebuilt from other random weights,
restored with :func:`load_checkpoint` and trained to 8: rank 0 writes what it compared.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.distributed.fsdp import fully_shard

from distill.train.checkpoint import (
    TrainerState,
    _full_state_options,
    is_sharded,
    load_checkpoint,
    save_checkpoint,
)
from tests.conftest import tiny_llama

VOCAB, STEPS, HALF = 64, 8, 4


def sharded_student(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = tiny_llama(VOCAB, layers=2, seed=seed).train()
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95))


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: range) -> list[float]:
    losses = []
    for step in steps:
        gen = torch.Generator().manual_seed(1000 * step + dist.get_rank())
        ids = torch.randint(0, VOCAB, (2, 12), generator=gen)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    return losses


def full_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Weights and optimizer tensors, whole, flattened to one name -> tensor dict (rank 0)."""
    weights, optim = get_state_dict(model, opt, options=_full_state_options())
    flat = {f"w.{k}": v for k, v in weights.items()}
    for name, entry in optim.get("state", {}).items():
        for key, value in entry.items():
            flat[f"o.{name}.{key}"] = torch.as_tensor(value)
    return flat


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model, opt = sharded_student(seed=0)
    assert is_sharded(model)
    straight_losses = train(model, opt, range(STEPS))
    straight = full_state(model, opt)

    model, opt = sharded_student(seed=0)
    first_losses = train(model, opt, range(HALF))
    state = TrainerState(HALF, 0, "fsdp2-test", dist.get_world_size())
    ckpt = save_checkpoint(
        out / "checkpoints",
        model=model,
        optimizer=opt,
        state=state,
        keep_last_n=2,
        is_main=rank == 0,
    )
    dist.barrier()  # rank 0 has renamed the checkpoint into place

    model, opt = sharded_student(seed=7)  # other weights: only the checkpoint can match
    restored = load_checkpoint(ckpt, model=model, optimizer=opt)
    resumed_losses = first_losses + train(model, opt, range(restored.step, STEPS))
    resumed = full_state(model, opt)
    if rank == 0:
        saved_optim = torch.load(ckpt / "optimizer.pt", weights_only=True)
        report = {
            "keys_equal": sorted(straight) == sorted(resumed),
            "num_optimizer_tensors": sum(k.startswith("o.") for k in straight),
            "mismatched": [k for k in straight if not torch.equal(straight[k], resumed[k])],
            "losses_equal": straight_losses == resumed_losses,
            "optimizer_keyed_by_name": all(isinstance(k, str) for k in saved_optim["state"]),
            "restored_step": restored.step,
        }
        (out / "report.json").write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
