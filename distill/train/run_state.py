"""Which training a run dir holds: the fingerprint of everything that shapes a trajectory, and
whether ``final/`` is this config's finished run (then the train stage is skipped)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict

from distill.config import PipelineConfig
from distill.errors import DistillError
from distill.run_dir import RunDir
from distill.train.checkpoint import TrainerState, complete_checkpoints, read_trainer_state

# The budget search's settings (distill.config.StudentConfig) that only act with a budget.
BUDGET_SEARCH_KEYS = ("budget_finalists", "budget_finalist_steps")


def config_fingerprint(cfg: PipelineConfig, num_processes: int = 1) -> str:
    """Hash of everything that shapes the trajectory (not eval/quant/publish settings).

    The per-process batch enters as the global batch, so a DDP run may resume on another
    process count as long as batch_size × processes is unchanged.
    """
    bookkeeping = {
        "resume",
        "eval_every_n_steps",
        "eval_max_blocks",
        "save_every_n_steps",
        "keep_last_n_checkpoints",
        "log_every_n_steps",
    }
    trajectory = {k: v for k, v in asdict(cfg.train).items() if k not in bookkeeping}
    trajectory["batch_size"] = cfg.train.batch_size * num_processes
    pair = asdict(cfg.pair)
    if cfg.pair.student.budget is None:
        # Without a budget they choose nothing; left out, a run made before they existed
        # stays this config's run.
        for key in BUDGET_SEARCH_KEYS:
            pair["student"].pop(key)
    payload = json.dumps(
        [pair, asdict(cfg.data), asdict(cfg.loss), trajectory],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def finished_state(cfg: PipelineConfig, rd: RunDir) -> TrainerState | None:
    """The newest checkpoint's state when ``final/`` holds this config's finished run, else None.

    ``final/`` is swapped in whole, so its presence means it is complete; which config made
    it is read from the newest checkpoint (always kept, and always written at ``max_steps``).
    The fingerprint is taken on the process count recorded there, so a run trained under
    ``accelerate launch`` is recognised by a later one-process ``scripts/pipeline.py run_dir=``.

    This config may still continue a ``final/`` it did not finish: with ``train.resume=auto``
    when the newest checkpoint is this config's, only short of more ``train.max_steps``, and
    from any checkpoint ``train.resume`` names by path.

    Raises:
        DistillError: ``final/`` exists but this config did not finish it and cannot continue
            it (training would overwrite another config's student).
    """
    if not (rd.final / "config.json").is_file():
        return None
    found = complete_checkpoints(rd.checkpoints)
    state = read_trainer_state(found[-1]) if found else None
    ours = state is not None and state.config_fingerprint == config_fingerprint(
        cfg, state.num_processes
    )
    if state is None:
        why = f"no complete checkpoint in {rd.checkpoints} records which config made it"
    elif not ours:
        why = f"{found[-1].name} was written with another pair/data/loss/train config"
    elif state.step < cfg.train.max_steps:
        why = f"its newest checkpoint is step {state.step} of train.max_steps={cfg.train.max_steps}"
    else:
        return state
    named = cfg.train.resume not in (None, "auto")
    if found and (named or (ours and cfg.train.resume == "auto")):
        return None  # asked to continue: training resumes and rewrites final/
    raise DistillError(
        f"{rd.final} holds a student this config did not finish ({why}); training would "
        f"overwrite it. Train into a new run dir, or delete {rd.final} and {rd.checkpoints} "
        "to retrain there"
    )
