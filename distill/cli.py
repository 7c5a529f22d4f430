"""What every Hydra entry point shares: validation, the run dir, one-line errors.

Stage scripts run on the Hydra run dir of the current job, or, given ``run_dir=<path>``, on
a previous run: then the config saved in that run (``config.yaml``) is used, with this
command line's overrides applied on top, so ``scripts/evaluate.py run_dir=...`` evaluates
what was trained there rather than today's defaults.
"""

from __future__ import annotations

import copy
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from distill.config import WIDTH_KEYS, PipelineConfig, register_configs, to_pipeline_config
from distill.errors import DistillError
from distill.evaluate import FAILED_FILE

log = logging.getLogger("distill")

register_configs()

CONFIG_FILE = "config.yaml"


def _hydra_run_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def _cli_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:  # not under @hydra.main (e.g. a test calling run_stage directly)
        return []


# The two ways to give a from_teacher student's depth; a pair file sets one of them.
DEPTH_KEYS = ("pair.student.num_layers", "pair.student.layers")
# A budget on the command line replaces every key of a pair file's shape.
BUDGET_KEY = "pair.student.budget"
SHAPE_KEYS = (*DEPTH_KEYS, *(f"pair.student.{k}" for k in WIDTH_KEYS))


def _override_key(override: str) -> str:
    """``pair.student.num_layers`` of ``pair.student.num_layers=8`` (or ``+``/``++``/``~``)."""
    return override.split("=", 1)[0].lstrip("+~")


def depth_from_command_line(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """``cfg`` with a student shape given on the command line replacing the pair file's.

    The default pair file lists ``pair.student.layers`` and an MLP width; without this,
    ``pair.student.num_layers=8`` on the command line (or a ``-m pair.student.num_layers=8,14``
    sweep) would be overruled by that list, and a depth for another teacher would inherit a
    width cut made for this one. So a depth on the command line (exactly one of
    :data:`DEPTH_KEYS`) clears the other depth key and the width keys the command line does
    not give too, and a budget clears every shape key it does not give (it chooses depth and
    widths itself). Both depth keys on the command line, or both in files, are left for the
    schema to check (:meth:`distill.config.StudentConfig.problems` fails when they disagree).
    """
    given = {_override_key(o) for o in overrides}
    on_command_line = [key for key in DEPTH_KEYS if key in given]
    if BUDGET_KEY in given:
        clear = list(SHAPE_KEYS)
    elif len(on_command_line) == 1:
        clear = [k for k in SHAPE_KEYS if k != on_command_line[0]]
    else:
        return cfg
    cleared = [k for k in clear if k not in given and OmegaConf.select(cfg, k) is not None]
    if not cleared:
        return cfg
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        for key in cleared:
            OmegaConf.update(cfg, key, None, merge=False)
    return cfg


def resolve(cfg: DictConfig) -> tuple[PipelineConfig, Path]:
    """The validated config and the run dir this stage works in.

    Raises:
        DistillError: invalid config, or a ``run_dir`` that holds no saved run.
    """
    run_dir_value = cfg.get("run_dir")
    if run_dir_value:
        run_dir = Path(str(run_dir_value)).expanduser()
        saved = run_dir / CONFIG_FILE
        if not saved.exists():
            raise DistillError(
                f"run_dir={run_dir_value}: no {CONFIG_FILE} there; pass the folder of a run made "
                "by scripts/pipeline.py or scripts/distill.py"
            )
        base = OmegaConf.load(saved)
        # Group choices (e.g. loss=jsd) cannot be re-applied to a saved run; plain key
        # overrides can, and they win over what was saved.
        keyed = [
            o
            for o in _cli_overrides()
            if "=" in o and "." in o.split("=", 1)[0] and not o.startswith("hydra")
        ]
        merged = OmegaConf.merge(base, OmegaConf.from_dotlist(keyed)) if keyed else base
        merged = depth_from_command_line(merged, keyed)
        merged.run_dir = str(run_dir)
        return to_pipeline_config(merged), run_dir
    cfg = depth_from_command_line(cfg, _cli_overrides())
    return to_pipeline_config(cfg), shared_run_dir(_hydra_run_dir())


def shared_run_dir(own: Path) -> Path:
    """Under ``accelerate launch`` every process runs Hydra and may stamp a different time
    into its run dir; the main process's choice is broadcast and the others' dirs removed."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return own
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    state = PartialState(cpu=not torch.cuda.is_available())
    chosen = broadcast_object_list([str(own)], from_process=0)[0]
    if not state.is_main_process and Path(chosen) != own:
        import shutil

        # Only Hydra's own bookkeeping is in it; no stage has written there yet.
        shutil.rmtree(own, ignore_errors=True)
    return Path(chosen)


def save_config(cfg: PipelineConfig, run_dir: Path) -> None:
    """Write the resolved config that stage scripts reload with ``run_dir=``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    node = OmegaConf.structured(cfg)
    node.run_dir = None
    (run_dir / CONFIG_FILE).write_text(OmegaConf.to_yaml(node))


def main_guard(
    stage: Callable[[PipelineConfig, Path], object], cfg: DictConfig, *, save: bool
) -> None:
    """Run ``stage`` with user errors printed as one line (exit 2), not a traceback."""
    logging.getLogger("distill").setLevel(logging.INFO)
    # Hydra puts the root logger at INFO, where matplotlib announces the font cache it builds
    # on a fresh machine ("generated new fontManager"), in the middle of the evaluate stage.
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    run_dir: Path | None = None
    try:
        pcfg, run_dir = resolve(cfg)
        if save:
            save_config(pcfg, run_dir)
        stage(pcfg, run_dir)
    except DistillError as err:
        _record_failure(run_dir, str(err))
        print(f"distill: error: {err}", file=sys.stderr, flush=True)
        if not _in_multirun():
            sys.exit(2)
    except Exception as err:
        _record_failure(run_dir, f"{type(err).__name__}: {err}")
        raise


def _record_failure(run_dir: Path | None, message: str) -> None:
    """Leave the error in the run dir, so scripts/report.py lists the run as failed."""
    if run_dir is None:
        return
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / FAILED_FILE).write_text(message + "\n")
    except OSError:
        pass


def _in_multirun() -> bool:
    """In a sweep a bad job is recorded and the sweep goes on to the next one."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:
        return False
