"""Where the models live under the launch: the frozen teacher's placement, and the output
projections the chunked loss may fuse with (not where weights are sharded)."""

from __future__ import annotations

import logging
from typing import Any

import torch
from accelerate import Accelerator

from distill.config import PipelineConfig
from distill.errors import DistillError
from distill.train.chunked_loss import fused_head

log = logging.getLogger(__name__)


def check_placement(placement: str, accelerator: Accelerator) -> None:
    """Refuse ``train.teacher_placement=shard`` where the launch shards nothing, before any
    weights load (it would otherwise replicate the teacher and say nothing).

    Raises:
        DistillError: ``shard`` outside FSDP and DeepSpeed ZeRO-3, naming both fixes.
    """
    from accelerate.utils import DistributedType

    if placement != "shard":
        return
    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        return
    plugin = accelerator.state.deepspeed_plugin if kind == DistributedType.DEEPSPEED else None
    if plugin is not None and plugin.zero_stage == 3:
        return
    launch = f"DeepSpeed ZeRO-{plugin.zero_stage}" if plugin is not None else f"{kind.value} launch"
    raise DistillError(
        f"train.teacher_placement=shard under a {launch}, which shards no weights: launch with "
        "an FSDP or DeepSpeed ZeRO-3 config (accelerate launch --config_file "
        "configs/accelerate/fsdp.yaml) or set train.teacher_placement=replicate"
    )


def place_teacher(teacher: Any, accelerator: Accelerator, placement: str) -> tuple[Any, bool]:
    """Put the frozen teacher where the launch wants it; and whether that changed it (cast to
    another dtype or wrapped for sharding), so the run's handle reloads it for later stages.

    ``replicate``: a full copy on every device, cast to the mixed-precision dtype on an
    accelerator (it only runs forward, so it needs no fp32 master weights). ``shard`` (checked
    by :func:`check_placement`): under FSDP each process keeps a shard and layers are
    all-gathered in forward (accelerate's FSDP2 wrapper); under DeepSpeed ZeRO-3 the teacher
    gets its own inference engine, as DeepSpeed requires for a second model.
    """
    from accelerate.utils import DistributedType

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision)
    kind = accelerator.distributed_type
    if placement == "shard" and kind == DistributedType.FSDP:
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        if dtype is not None:
            teacher.to(dtype)
        return fsdp2_prepare_model(accelerator, teacher).eval(), True
    if placement == "shard" and kind == DistributedType.DEEPSPEED:
        import deepspeed

        ds_config = {
            "train_micro_batch_size_per_gpu": 1,
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
            "bf16": {"enabled": dtype is torch.bfloat16},
            "fp16": {"enabled": dtype is torch.float16},
        }
        engine, *_ = deepspeed.initialize(model=teacher, config=ds_config)
        return engine.module.eval(), True
    cast = dtype is not None and accelerator.device.type != "cpu"
    if cast:
        teacher.to(dtype)
    return teacher.to(accelerator.device), cast


def fused_heads(
    cfg: PipelineConfig, accelerator: Accelerator, student: Any, teacher: Any
) -> tuple[Any, Any]:
    """The output projections the chunked loss is fused with; None (reason logged) where
    logits must be made whole: loss.chunk_size=null, sharded weights, or an architecture
    whose logits are not ``lm_head(last hidden state)``."""
    if cfg.loss.chunk_size is None:
        return None, None
    from accelerate.utils import DistributedType

    online_kd = cfg.train.teacher_mode == "online" and cfg.loss.kd_ratio > 0.0
    heads = []
    for name, model, needed in (("student", student, True), ("teacher", teacher, online_kd)):
        head = None
        if needed:
            kind = accelerator.distributed_type
            if kind in (DistributedType.FSDP, DistributedType.DEEPSPEED):
                head = f"{kind} shards the output projection"
            else:
                head = fused_head(model)
            if isinstance(head, str):
                log.info("loss: %s logits made whole, then chunked (%s)", name, head)
                head = None
        heads.append(head)
    return heads[0], heads[1]
