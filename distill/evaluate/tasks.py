"""Benchmark task scores from lm-evaluation-harness, on every variant in its own runtime.

Users judge a model by the scores its Hub card shows, and lm-evaluation-harness computes
them. ``eval.lm_eval_tasks`` names tasks (lm-eval's own, or local YAML tasks in the folders
of ``eval.lm_eval_include``); each row of the report is scored on all of them with the same
few-shot count, example limit, context length and seeds:

* PyTorch rows through lm-eval's own ``HFLM``, given the loaded model (the int8 torchao
  model included) and the run's tokenizer;
* GGUF rows through :class:`GGUFLM`: lm-eval's ``TemplateLM`` over the file open in llama.cpp
  (:class:`distill.models.LlamaRuntime`). Text becomes ids through ``HFLM``'s own
  tokenization code and the same tokenizer, so both kinds of row score the same token
  sequences (the quantize stage's parity check holds llama.cpp's embedded tokenizer to those
  ids); log-likelihoods are llama.cpp's logits, answers its greedy decode.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distill.errors import DistillError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from distill.config import EvalConfig
    from distill.models import LlamaRuntime

log = logging.getLogger(__name__)

LM_EVAL_REQUIREMENT = "lm-eval==0.4.13"
# Seeds of lm-eval's sampling of few-shot examples and of any shuffling, fixed for every row.
SEED = 1234


class TaskError(DistillError):
    """lm-evaluation-harness cannot run the configured tasks (the message names the fix)."""


@functools.lru_cache(maxsize=4)
def _manager(include: tuple[str, ...], defaults: bool) -> Any:
    try:
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise TaskError(
            f"eval.lm_eval_tasks needs lm-evaluation-harness ({err}); install it with "
            f"`pip install {LM_EVAL_REQUIREMENT}` (`make setup` does)"
        ) from None
    paths = [str(Path(p).expanduser().resolve()) for p in include]
    return TaskManager(include_path=paths or None, include_defaults=defaults)


def _task_manager(include: Sequence[str], tasks: Sequence[str] = ()) -> Any:
    """lm-eval's index of the tasks in ``include`` (and its own, unless the local folders
    already hold every one of ``tasks``: indexing lm-eval's thousands takes seconds)."""
    include = tuple(include)
    if include and tasks:
        local = _manager(include, False)
        if all(t in local.all_tasks for t in tasks):
            return local
    return _manager(include, True)


def check_tasks(cfg: EvalConfig) -> None:
    """Fail before any model loads on a task lm-eval does not know (a typo, or a local task
    whose folder is not in ``eval.lm_eval_include``).

    Raises:
        TaskError: naming the unknown tasks and where lm-eval looked.
    """
    if not cfg.lm_eval_tasks:
        return
    manager = _task_manager(cfg.lm_eval_include, cfg.lm_eval_tasks)
    unknown = [t for t in cfg.lm_eval_tasks if t not in manager.all_tasks]
    if unknown:
        where = f"lm-eval's own tasks and {list(cfg.lm_eval_include)}"
        raise TaskError(
            f"eval.lm_eval_tasks: {unknown} not found in {where}; give a folder of task YAMLs "
            "in eval.lm_eval_include for a local task"
        )


@contextlib.contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """lm-eval's INFO and WARNING lines (seeds set, tasks built, "an already-initialized model
    was passed") off while it runs: the report states the settings. Its progress bars stay."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@dataclass
class Tasks:
    """The configured tasks, run the same way on every row (made by :func:`tasks_for`)."""

    cfg: EvalConfig
    tokenizer: PreTrainedTokenizerBase
    manager: Any
    # The ids that end an answer (the teacher's generation config): where HFLM's generate
    # stops, so where a GGUF row's answer stops too.
    stops: tuple[int, ...]

    def max_length(self, config: Any) -> int:
        """``eval.lm_eval_max_length``, but never past the model's own context."""
        limit = getattr(config, "max_position_embeddings", None)
        return (
            min(self.cfg.lm_eval_max_length, int(limit)) if limit else self.cfg.lm_eval_max_length
        )

    def _evaluate(self, lm: Any) -> dict[str, Any]:
        from lm_eval import simple_evaluate

        with _quiet_lm_eval():
            out = simple_evaluate(
                model=lm,
                tasks=list(self.cfg.lm_eval_tasks),
                num_fewshot=self.cfg.lm_eval_num_fewshot,
                limit=self.cfg.lm_eval_limit,
                task_manager=self.manager,
                log_samples=False,
                bootstrap_iters=200,  # closed-form stderr for means; bootstrap for the rest
                random_seed=SEED,
                numpy_random_seed=SEED,
                torch_random_seed=SEED,
                fewshot_random_seed=SEED,
            )
        return task_scores(out)

    def score_model(self, model: PreTrainedModel) -> dict[str, Any]:
        """Every task on a loaded PyTorch model, through lm-eval's ``HFLM``."""
        import torch
        from lm_eval.models.huggingface import HFLM

        with _quiet_lm_eval():
            lm = HFLM(
                pretrained=model,
                tokenizer=self.tokenizer,
                batch_size=self.cfg.lm_eval_batch_size,
                max_length=self.max_length(model.config),
                # fp32 log-softmax, as the GGUF rows take it: bf16 rows (torchao's) would
                # otherwise round their log-likelihoods coarser than the rest.
                softmax_dtype="float32",
            )
        with torch.inference_mode():
            return self._evaluate(lm)

    def score_gguf(self, runtime: LlamaRuntime, config: Any) -> dict[str, Any]:
        """Every task on a GGUF file open in llama.cpp (:class:`GGUFLM`); ``config`` is the
        Hugging Face config of the model the file holds. The runtime must be opened with at
        least :meth:`max_length` positions."""
        lm = gguf_lm(
            runtime,
            self.tokenizer,
            self.max_length(config),
            int(config.vocab_size),
            self.stops,
        )
        return self._evaluate(lm)


def tasks_for(
    cfg: EvalConfig, tokenizer: PreTrainedTokenizerBase, stops: Sequence[int]
) -> Tasks | None:
    """The configured tasks, checked (:func:`check_tasks`); None when there are none.
    ``stops``: the ids that end an answer (:func:`distill.sampling.stop_ids` of the teacher)."""
    if not cfg.lm_eval_tasks:
        return None
    check_tasks(cfg)  # builds the index that the next line takes from the cache
    manager = _task_manager(cfg.lm_eval_include, cfg.lm_eval_tasks)
    return Tasks(cfg, tokenizer, manager, tuple(int(t) for t in stops))


def task_scores(results: dict[str, Any]) -> dict[str, Any]:
    """Per task, lm-eval's metrics without its filter suffix (``"acc,none"`` -> ``"acc"``),
    their standard errors, the examples scored and the few-shot count used."""
    out: dict[str, Any] = {}
    for task, metrics in (results.get("results") or {}).items():
        entry: dict[str, Any] = {}
        for key, value in metrics.items():
            if (
                key == "alias"
                or key.startswith("sample_len")
                or not isinstance(value, (int, float))
            ):
                continue  # sample_len: lm-eval's count of examples, kept as "examples"
            name, _, flt = key.partition(",")
            entry[name if flt in ("", "none") else f"{name},{flt}"] = float(value)
        n = (results.get("n-samples") or {}).get(task) or {}
        entry["examples"] = n.get("effective")
        entry["num_fewshot"] = (results.get("n-shot") or {}).get(task)
        out[task] = entry
    return out


def main_metrics(scores: dict[str, Any]) -> list[str]:
    """The metric names a table shows for one task's scores (no stderr, counts or settings)."""
    skip = ("examples", "num_fewshot")
    return [k for k in scores if k not in skip and not k.split(",")[0].endswith("_stderr")]


def gguf_lm(
    runtime: LlamaRuntime,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    vocab_size: int,
    stops: Sequence[int],
) -> Any:
    """A :class:`GGUFLM` (built here: its base class is lm-eval's, imported on use)."""
    import torch
    from lm_eval.api.model import TemplateLM
    from lm_eval.models.huggingface import HFLM
    from lm_eval.models.utils import (
        handle_stop_sequences,
        normalize_gen_kwargs,
        postprocess_generated_text,
    )
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    class GGUFLM(TemplateLM):
        """lm-eval's model interface over a GGUF file in llama.cpp."""

        # HFLM's own tokenization, on the same tokenizer: the torch rows' token sequences.
        tok_encode = HFLM.tok_encode
        tok_decode = HFLM.tok_decode
        eot_token_id = HFLM.eot_token_id
        prefix_token_id = HFLM.prefix_token_id

        def __init__(self) -> None:
            super().__init__()
            self.tokenizer = tokenizer
            self.add_bos_token = None  # as HFLM left at its default
            self.custom_prefix_token_id = None
            self.max_length = max_length

        def _score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
            if not continuation:
                return 0.0, True
            whole = (context + continuation)[-(self.max_length + 1) :]
            continuation = continuation[-(len(whole) - 1) :]
            prompt = whole[: len(whole) - len(continuation)]
            logits = runtime.completion_logits(prompt, continuation, vocab_size)
            logprobs = torch.log_softmax(logits.double(), dim=-1)
            target = torch.tensor(continuation)
            total = float(logprobs.gather(1, target[:, None]).sum())
            return total, bool((logprobs.argmax(-1) == target).all())

        def _loglikelihood_tokens(self, requests: Any, **kwargs: Any) -> list[tuple[float, bool]]:
            return [self._score(list(ctx), list(cont)) for _, ctx, cont in requests]

        def loglikelihood_rolling(self, requests: Any, disable_tqdm: bool = False) -> list[float]:
            out = []
            for (text,) in (r.args for r in requests):
                windows = get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
                total = 0.0
                for window in map(make_disjoint_window, windows):
                    total += self._score(list(window[0]), list(window[1]))[0]
                out.append(total)
            return out

        def generate_until(self, requests: Any, disable_tqdm: bool = False) -> list[str]:
            """Greedy answers as HFLM writes them: the same stop strings (the task's and the
            EOS text), the same stop ids, special tokens dropped from the text."""
            eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
            out = []
            for context, gen_kwargs in (r.args for r in requests):
                kwargs = normalize_gen_kwargs(dict(gen_kwargs), 256)
                if kwargs.get("do_sample"):
                    raise TaskError(
                        f"a task asks for sampled answers ({gen_kwargs}); GGUF rows answer "
                        "greedily, so the rows would not be scored alike: choose a greedy task"
                    )
                until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
                new = int(kwargs["max_gen_toks"])
                if new >= self.max_length:
                    raise TaskError(
                        f"a task asks for {new} new tokens, not fewer than the {self.max_length}"
                        "-token context (eval.lm_eval_max_length or the model's own)"
                    )
                ids = self.tok_encode(context)[-(self.max_length - new) :]
                (answer,) = runtime.generate([ids], new, list(stops), vocab_size=vocab_size)
                text = self.tok_decode([t for t in answer if t not in stops])
                out.append(postprocess_generated_text(text, until, None))
            return out

    return GGUFLM()


def describe(cfg: EvalConfig) -> dict[str, Any]:
    """The settings every row was scored with (``report.json``'s ``lm_eval``)."""
    import lm_eval

    return {
        "version": lm_eval.__version__,
        "tasks": list(cfg.lm_eval_tasks),
        "include": list(cfg.lm_eval_include),
        "num_fewshot": cfg.lm_eval_num_fewshot,
        "limit": cfg.lm_eval_limit,
        "max_length": cfg.lm_eval_max_length,
        "seed": SEED,
    }


def task_metrics(scores: dict[str, Any]) -> dict[str, float | None]:
    """A row's ``lm_eval`` as flat metrics ``lm_eval:<task>:<metric>`` (frontier ranking)."""
    return {
        f"lm_eval:{task}:{m}": entry.get(m)
        for task, entry in scores.items()
        for m in main_metrics(entry)
    }


def _stderr(entry: dict[str, Any], metric: str) -> float | None:
    name, _, flt = metric.partition(",")
    value = entry.get(f"{name}_stderr" + (f",{flt}" if flt else ""))
    return value if isinstance(value, float) else None


def _cell(entry: dict[str, Any] | None, metric: str) -> str:
    if not entry or not isinstance(entry.get(metric), float):
        return "—"
    stderr = _stderr(entry, metric)
    return f"{entry[metric]:.3f}" + (f" ± {stderr:.3f}" if stderr is not None else "")


def task_lines(report: dict[str, Any]) -> list[str]:
    """report.md's lm-evaluation-harness table: a row per variant, a column per task metric
    (± its standard error), then the settings every row shared. Empty without scores."""
    scored = [v for v in report["variants"] if v.get("lm_eval")]
    if not scored:
        return []
    columns: list[tuple[str, str]] = []
    for v in scored:
        for task, entry in v["lm_eval"].items():
            columns += [(task, m) for m in main_metrics(entry) if (task, m) not in columns]
    head = ["variant", *(f"{task} {m}" for task, m in columns)]
    lines = [
        "## Task scores (lm-evaluation-harness)",
        "",
        "| " + " | ".join(head) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for v in scored:
        cells = [_cell(v["lm_eval"].get(task), m) for task, m in columns]
        lines.append(f"| {v['name']} | " + " | ".join(cells) + " |")
    settings = report.get("lm_eval") or {}
    first = scored[0]["lm_eval"]
    shots = ", ".join(f"{t} {e.get('num_fewshot')}-shot" for t, e in first.items())
    examples = ", ".join(f"{t} {e.get('examples')}" for t, e in first.items())
    lines += [
        "",
        f"- lm-evaluation-harness {settings.get('version', '?')}; every row with the same "
        f"settings: {shots}; examples {examples}; context up to {settings.get('max_length')} "
        f"tokens (a model's own context where shorter); seed {settings.get('seed')}. PyTorch "
        "rows through lm-eval's HFLM, GGUF rows in llama.cpp (log-likelihoods from its "
        "logits, answers its greedy decode), on the same token ids. ± is lm-eval's standard "
        "error.",
    ]
    failed = [v for v in report["variants"] if v.get("lm_eval_error")]
    lines += [f"- Not scored: {v['name']}: {v['lm_eval_error']}" for v in failed]
    return lines


def model_index(report: dict[str, Any] | None, name: str, variant: str = "student") -> list:
    """The Hub card's ``model-index`` entry for ``variant``'s task scores ([] without any)."""
    row = next((v for v in (report or {}).get("variants", []) if v["name"] == variant), None)
    scores = (row or {}).get("lm_eval") or {}
    results = []
    for task, entry in scores.items():
        metrics = [
            {
                "type": m,
                "value": round(entry[m], 4),
                "name": f"{m} ({entry.get('num_fewshot')}-shot)",
            }
            for m in main_metrics(entry)
            if isinstance(entry.get(m), float)
        ]
        if metrics:
            results.append(
                {
                    "task": {"type": "text-generation"},
                    "dataset": {"name": task, "type": task},
                    "metrics": metrics,
                }
            )
    return [{"name": name, "results": results}] if results else []
