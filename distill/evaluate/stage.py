"""Score every model of a run on the same held-out blocks and write the comparison.

Variants: ``teacher``, ``student_init`` (before distillation), ``student`` (``final/``),
``student-<method>`` for each quantized folder and ``student-gguf-<type>`` for each GGUF file
(evaluated as transformers reloads it, dequantized; its ``weight_bytes`` are the file's tensor
bytes). Every row has ``bits_per_weight`` (weight bytes x 8 / parameters) and quantized rows
the ``parity`` figures of the quantize stage. Quality is measured against the teacher on
the first ``eval.max_blocks`` validation blocks:

* perplexity = exp(mean next-token cross-entropy), in nats per token before exp;
* ``kl_to_teacher`` = mean over the same positions of KL(teacher || variant), in nats;
* ``top1_agreement`` = fraction of positions where the argmax tokens agree.

The teacher's log-probabilities are computed once, during the teacher's own pass, kept on
the CPU in fp32 (``max_blocks * block_size * vocab * 4`` bytes, 1.6 GB for 32 x 256 x 49152)
and reused for every other variant in the same batch order.

Footprint and speed: ``weight_bytes`` counts the bytes the loaded tensors really hold (see
:mod:`distill.models.footprint`), ``disk_bytes`` the variant folder's weight files, and
``peak_memory_bytes`` the growth of memory from just before the variant is loaded to the end
of its evaluation (see :class:`PeakMemory` for how, on CPU and CUDA). Prefill and decode
speeds are medians over ``eval.repeats`` timed runs after one warm-up, at batch size 1.
Variants named in ``eval.compiled_decode`` are also timed compiled
(:mod:`distill.evaluate.compiled_decode`), after their peak-memory window closes.
"""

from __future__ import annotations

import ctypes
import gc
import json
import logging
import math
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from distill.config import DistillError, EvalConfig, PipelineConfig, cache_root
from distill.evaluate.memory import (
    BANDWIDTH_METHOD,
    MemoryModel,
    decode_bound_tokens_per_s,
    kv_cache_bytes_per_token,
    measure_bandwidth,
)
from distill.models.footprint import disk_bytes, param_count, weight_bytes

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
PLOT_PNG = "memory_vs_quality.png"
MB = 1_000_000  # decimal megabyte, as disk sizes are quoted


class EvalError(DistillError):
    """The run folder or the held-out data cannot be evaluated."""


# --------------------------------------------------------------------------------------------
# Metrics: pure functions on tensors
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScoreSums:
    """Sums over scored positions; add them across batches, divide once at the end.

    Summing (not averaging per batch) keeps the means exact when batches differ in size.
    """

    ce_sum: float = 0.0
    kl_sum: float = 0.0
    top1_matches: int = 0
    num_tokens: int = 0

    def __add__(self, other: ScoreSums) -> ScoreSums:
        return ScoreSums(
            self.ce_sum + other.ce_sum,
            self.kl_sum + other.kl_sum,
            self.top1_matches + other.top1_matches,
            self.num_tokens + other.num_tokens,
        )

    @property
    def mean_ce(self) -> float:
        """Mean next-token cross-entropy in nats (NaN when nothing was scored)."""
        return self.ce_sum / self.num_tokens if self.num_tokens else math.nan

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_ce) if self.num_tokens else math.nan

    @property
    def kl(self) -> float:
        """Mean KL(teacher || model) per position, in nats."""
        return self.kl_sum / self.num_tokens if self.num_tokens else math.nan

    @property
    def top1(self) -> float:
        return self.top1_matches / self.num_tokens if self.num_tokens else math.nan


def score_logits(
    logits: torch.Tensor, teacher_logits: torch.Tensor, tokens: torch.Tensor
) -> ScoreSums:
    """Next-token CE, KL(teacher || model) and top-1 agreement summed over a batch.

    Position ``t`` predicts ``tokens[:, t + 1]``, so ``T - 1`` positions per row are scored
    (blocks are packed, there is no padding to mask). Everything is computed in fp32 whatever
    the input dtype, and summed in float64 on the host.

    Args:
        logits: ``(B, T, V)`` the evaluated model's logits.
        teacher_logits: ``(B, T, V)`` the teacher's logits or log-probabilities (log_softmax
            of log-probabilities is the identity, so either works).
        tokens: ``(B, T)`` int64 token ids the logits were computed on.

    Raises:
        ValueError: shapes disagree, or ``T < 2`` (no next token to score).
    """
    if logits.shape != teacher_logits.shape:
        raise ValueError(
            f"model logits {tuple(logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in shape"
        )
    if logits.dim() != 3 or tokens.shape != logits.shape[:2]:
        raise ValueError(
            f"expected logits (B, T, V) and tokens (B, T), got {tuple(logits.shape)} and "
            f"{tuple(tokens.shape)}"
        )
    if tokens.shape[1] < 2:
        raise ValueError(f"need at least 2 tokens per row to score, got T={tokens.shape[1]}")
    model_lp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    teacher_lp = F.log_softmax(teacher_logits[:, :-1].float(), dim=-1)
    targets = tokens[:, 1:].to(model_lp.device)
    teacher_lp = teacher_lp.to(model_lp.device)

    ce = -model_lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    teacher_p = teacher_lp.exp()
    # Where the teacher gives a token probability 0 its term is 0, not 0 * (-inf) = NaN.
    kl = torch.where(teacher_p > 0, teacher_p * (teacher_lp - model_lp), 0.0).sum(-1)
    agree = model_lp.argmax(-1) == teacher_lp.argmax(-1)
    return ScoreSums(
        ce_sum=float(ce.double().sum()),
        kl_sum=float(kl.double().sum()),
        top1_matches=int(agree.sum()),
        num_tokens=int(targets.numel()),
    )


def median_rate(num_items: int, seconds: Sequence[float]) -> float:
    """``num_items`` per second at the median of ``seconds`` (robust to one slow run)."""
    return num_items / max(statistics.median(seconds), 1e-12)


# --------------------------------------------------------------------------------------------
# Peak memory
# --------------------------------------------------------------------------------------------


def _release_freed_memory() -> None:
    """Return freed heap pages to the OS so the next RSS baseline is not inflated.

    glibc keeps freed arenas mapped; without ``malloc_trim`` a variant evaluated after a
    large one would start from a high RSS and show too little growth.
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): best effort only
        pass


class PeakMemory:
    """Peak memory growth between :meth:`start` and :meth:`stop`.

    * CPU: a daemon thread samples the process RSS (``psutil``) every ``interval_s``; the
      result is the largest sample minus the RSS just before :meth:`start` returned.
      Memory the caller deliberately keeps (the teacher's cached log-probs) is reported via
      :meth:`exclude` and subtracted from each sample taken after it.
    * CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``,
      minus the bytes allocated at :meth:`start` (tensors only, not the caching
      allocator's reserve or the CUDA context).
    """

    def __init__(self, device: torch.device, interval_s: float = 0.005) -> None:
        self.device = device
        self.interval_s = interval_s
        self.method = (
            "cuda_max_memory_allocated_growth" if device.type == "cuda" else "cpu_peak_rss_growth"
        )
        self._baseline = 0
        self._peak = 0
        self._excluded = 0
        self._running = False
        self._stop_event = threading.Event()
        self._thread: threading.Thread | None = None
        self._process = psutil.Process()

    def start(self) -> PeakMemory:
        _release_freed_memory()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._baseline = torch.cuda.memory_allocated(self.device)
        else:
            self._baseline = self._process.memory_info().rss
            self._peak = self._baseline
            self._stop_event.clear()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        self._running = True
        return self

    def _sample(self) -> None:
        while not self._stop_event.is_set():
            self._record()
            self._stop_event.wait(self.interval_s)

    def _record(self) -> None:
        rss = self._process.memory_info().rss - self._excluded
        if rss > self._peak:
            self._peak = rss

    def exclude(self, num_bytes: int) -> None:
        """Do not count ``num_bytes`` allocated from now on (on CPU; ignored on CUDA)."""
        self._excluded += num_bytes

    def stop(self) -> int:
        """Stop measuring (idempotent) and return the peak growth in bytes."""
        if self._running:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
                self._peak = torch.cuda.max_memory_allocated(self.device)
            else:
                self._record()
                self._stop_event.set()
                assert self._thread is not None
                self._thread.join()
            self._running = False
        return max(0, self._peak - self._baseline)


# --------------------------------------------------------------------------------------------
# One variant
# --------------------------------------------------------------------------------------------


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_runs(fn: Callable[[], object], repeats: int, device: torch.device) -> list[float]:
    """Wall seconds of ``repeats`` calls of ``fn`` after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        # CUDA kernels run asynchronously; without this the clock stops at launch.
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def _max_positions(model: PreTrainedModel) -> int | None:
    value = getattr(model.config, "max_position_embeddings", None)
    return int(value) if value else None


def measure_prefill(
    model: PreTrainedModel, prompt: torch.Tensor, repeats: int
) -> tuple[float, int]:
    """Prompt tokens per second of one forward pass at batch size 1.

    Args:
        prompt: ``(1, P)`` token ids.

    Returns:
        (tokens per second at the median run, P).
    """
    device = model_device(model)
    ids = prompt.to(device)

    def forward() -> object:
        return model(input_ids=ids, use_cache=False).logits

    return median_rate(ids.shape[1], _time_runs(forward, repeats, device)), ids.shape[1]


def greedy_generation_config(model: Any, new_tokens: int) -> Any:
    """Greedy decoding of exactly ``new_tokens`` tokens, whatever the folder's own config says.

    A fresh config: the folder's generation_config may ask for sampling, and
    ``min_new_tokens = max_new_tokens`` keeps an early EOS from shortening a timed run.
    """
    from transformers import GenerationConfig

    eos = model.config.eos_token_id
    pad = model.config.pad_token_id
    if pad is None:  # generate wants one id; some configs list several EOS ids
        pad = eos[0] if isinstance(eos, list) else eos
    return GenerationConfig(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=pad,
    )


def measure_decode(
    model: PreTrainedModel, prompt: torch.Tensor, new_tokens: int, repeats: int
) -> float:
    """New tokens per second of greedy ``generate`` after ``prompt``, all sequences together.

    The time covers the whole ``generate`` call (the prompt's prefill included), divided by
    the ``B * new_tokens`` it must produce: ``min_new_tokens = max_new_tokens`` so an early EOS
    cannot shorten the run and flatter a variant.

    Args:
        prompt: ``(B, P)`` token ids (B sequences decoded as one batch).
    """
    device = model_device(model)
    ids = prompt.to(device)
    gen_cfg = greedy_generation_config(model, new_tokens)
    attention_mask = torch.ones_like(ids)

    def generate() -> object:
        out = model.generate(
            input_ids=ids, attention_mask=attention_mask, generation_config=gen_cfg
        )
        if out.shape[1] != ids.shape[1] + new_tokens:
            raise RuntimeError(f"generate produced {out.shape[1] - ids.shape[1]} != {new_tokens}")
        return out

    return median_rate(ids.shape[0] * new_tokens, _time_runs(generate, repeats, device))


def _kv_dtype_bytes(model: PreTrainedModel) -> int:
    """Bytes per cached K/V value: the model's compute dtype (fp32 for weight-only int8/int4)."""
    return getattr(model, "dtype", torch.float32).itemsize


def add_memory_fields(
    row: dict[str, Any], cfg: EvalConfig, bandwidth_bytes_per_s: float | None
) -> None:
    """Memory model and bandwidth bound of one report row, in place (:mod:`distill.evaluate.memory`).

    ``memory_model``: stored weight bytes + the KV cache of ``eval.memory_batch_size``
    sequences of ``eval.memory_context_tokens``, and whether that fits
    ``eval.memory_budget_bytes``. The bound uses the bytes decode actually reads, the
    weights as loaded (a GGUF row is loaded dequantized to fp32), plus the mean cached
    context of the timed decode.
    """
    mm = MemoryModel(
        weight_bytes=int(row["weight_bytes"]),
        kv_bytes_per_token=int(row["kv_cache_bytes_per_token"]),
        context_tokens=cfg.memory_context_tokens,
        batch_size=cfg.memory_batch_size,
    )
    row["memory_model"] = {
        "context_tokens": mm.context_tokens,
        "batch_size": mm.batch_size,
        "weight_bytes": mm.weight_bytes,
        "kv_cache_bytes": mm.kv_cache_bytes,
        "total_bytes": mm.total_bytes,
        "budget_bytes": cfg.memory_budget_bytes,
        "fits_budget": None
        if cfg.memory_budget_bytes is None
        else mm.total_bytes <= cfg.memory_budget_bytes,
    }
    if bandwidth_bytes_per_s is None:
        return
    mean_context = row["prompt_tokens"] + (row["decode_tokens"] - 1) / 2
    loaded = int(row.get("loaded_weight_bytes") or row["weight_bytes"])
    kv = int(row["kv_cache_bytes_per_token"])
    bound = decode_bound_tokens_per_s(bandwidth_bytes_per_s, loaded, kv, mean_context)
    row["decode_bytes_per_token"] = loaded + kv * mean_context
    row["decode_bound_tokens_per_s"] = bound
    row["decode_bound_ratio"] = row["decode_tokens_per_s"] / bound
    if row.get("decode_tokens_per_s_batch") is not None:
        b = int(row["decode_batch_size"])
        bound_b = decode_bound_tokens_per_s(bandwidth_bytes_per_s, loaded, kv, mean_context, b)
        row["decode_bound_tokens_per_s_batch"] = bound_b
        row["decode_bound_ratio_batch"] = row["decode_tokens_per_s_batch"] / bound_b
    if row.get("decode_compiled_tokens_per_s") is not None:
        row["decode_compiled_bound_ratio"] = row["decode_compiled_tokens_per_s"] / bound


def batches_of(blocks: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Consecutive ``(b, T)`` slices of ``blocks`` ``(N, T)``, b <= batch_size, in order."""
    return [blocks[i : i + batch_size] for i in range(0, blocks.shape[0], batch_size)]


def score_model(
    name: str,
    model: PreTrainedModel,
    blocks: torch.Tensor,
    teacher_logits_batches: Sequence[torch.Tensor] | None,
    batch_size: int,
    *,
    collect: list[torch.Tensor] | None = None,
    memory: PeakMemory | None = None,
) -> ScoreSums:
    """Score ``model`` on ``blocks`` ``(N, T)`` against the teacher's batches.

    Args:
        teacher_logits_batches: one ``(b, T, V)`` tensor per batch of
            :func:`batches_of`; ``None`` when ``model`` is the teacher itself.
        collect: if given, the model's own fp32 log-probs ``(b, T, V)`` are appended per
            batch, on the CPU (how the teacher's reference is built in its own pass).
        memory: told to exclude the collected tensors from the peak.

    Raises:
        ValueError: the teacher batches do not match ``blocks`` and ``batch_size``.
    """
    device = model_device(model)
    batches = batches_of(blocks, batch_size)
    if teacher_logits_batches is not None and len(teacher_logits_batches) != len(batches):
        raise ValueError(
            f"{len(teacher_logits_batches)} teacher batches for {len(batches)} batches of "
            f"{batch_size} blocks: compute them with the same blocks and batch size"
        )
    total = ScoreSums()
    with tqdm(total=blocks.shape[0], desc=f"eval {name}", unit="block", leave=False) as bar:
        for i, batch in enumerate(batches):
            ids = batch.to(device)
            logits = model(input_ids=ids, use_cache=False).logits
            log_probs = F.log_softmax(logits.float(), dim=-1)
            del logits  # the vocab-sized activations dominate memory; keep one copy
            if collect is not None:
                kept = log_probs.cpu()
                collect.append(kept)
                if memory is not None:
                    memory.exclude(kept.numel() * kept.element_size())
            reference = log_probs if teacher_logits_batches is None else teacher_logits_batches[i]
            if reference.shape != log_probs.shape:
                raise ValueError(
                    f"teacher batch {i} has shape {tuple(reference.shape)}, the model's "
                    f"{tuple(log_probs.shape)}: vocabularies or blocks differ"
                )
            # One row at a time: scoring makes several fp32 temporaries the size of its
            # input, and at (B, T, V) they, not the model, would set the peak memory.
            for r in range(ids.shape[0]):
                total = total + score_logits(
                    log_probs[r : r + 1], reference[r : r + 1].to(device), ids[r : r + 1]
                )
            del log_probs
            bar.update(batch.shape[0])
    return total


def evaluate_variant(
    name: str,
    model: PreTrainedModel,
    blocks: torch.Tensor,
    teacher_logits_batches: Sequence[torch.Tensor] | None,
    cfg: EvalConfig,
    folder: Path | None = None,
    *,
    memory: PeakMemory | None = None,
    collect: list[torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Quality, footprint and speed of one loaded model: one row of the report.

    Args:
        name: variant name written in the report.
        blocks: ``(N, T)`` int64 held-out blocks (already cut to ``cfg.max_blocks``).
        teacher_logits_batches: the teacher's ``(b, T, V)`` log-probs per batch of
            ``cfg.batch_size`` blocks, in order; ``None`` when ``model`` is the teacher
            (KL is then 0 and agreement 1 by construction). See :func:`score_model`.
        folder: the folder the model was loaded from (for ``disk_bytes``), if any.
        memory: a :class:`PeakMemory` the caller started before loading the model; without
            it the peak covers this evaluation only and excludes loading.
        collect: receives the model's own log-probs per batch (see :func:`score_model`).

    Raises:
        EvalError: ``blocks`` holds no block of at least 2 tokens.
        ValueError: the teacher batches do not line up with ``blocks``.
    """
    if blocks.dim() != 2 or blocks.shape[0] == 0 or blocks.shape[1] < 2:
        raise EvalError(
            f"held-out blocks have shape {tuple(blocks.shape)}: need at least one block of "
            ">= 2 tokens (lower data.block_size or add text)"
        )
    own_memory = memory is None
    tracker = PeakMemory(model_device(model)).start() if memory is None else memory
    try:
        model.eval()
        with torch.inference_mode():
            sums = score_model(
                name,
                model,
                blocks,
                teacher_logits_batches,
                cfg.batch_size,
                collect=collect,
                memory=tracker,
            )
            flat = blocks.reshape(1, -1)
            limit = _max_positions(model)
            prefill_len = min(cfg.prefill_tokens, flat.shape[1], limit or flat.shape[1])
            prefill_rate, prefill_len = measure_prefill(model, flat[:, :prefill_len], cfg.repeats)
            prompt_len = min(cfg.prompt_tokens, flat.shape[1])
            if limit is not None:
                prompt_len = max(1, min(prompt_len, limit - cfg.decode_tokens))
            decode_rate = measure_decode(
                model, flat[:, :prompt_len], cfg.decode_tokens, cfg.repeats
            )
            batch_rate = None
            if cfg.decode_batch_size > 1:
                # Distinct prompts per sequence, cut from consecutive stretches of held-out text.
                need = cfg.decode_batch_size * prompt_len
                prompts = (
                    flat[:, :need]
                    if flat.shape[1] >= need
                    else flat[:, :prompt_len].repeat(1, cfg.decode_batch_size)
                )
                batch_rate = measure_decode(
                    model,
                    prompts.reshape(cfg.decode_batch_size, prompt_len),
                    cfg.decode_tokens,
                    cfg.repeats,
                )
    finally:
        peak = tracker.stop()  # also ends the sampling thread when scoring raised
    method = tracker.method + (" (evaluation only, loading excluded)" if own_memory else "")
    loaded_bytes = weight_bytes(model)
    # After the peak-memory window: compiling holds packed copies of the weights.
    compiled = compiled_decode_fields(name, model, flat[:, :prompt_len], cfg)
    return {
        "name": name,
        "params": param_count(model),
        "weight_bytes": loaded_bytes,
        "disk_bytes": (disk_bytes(folder) or None) if folder is not None else None,
        "peak_memory_bytes": peak,
        "peak_memory_method": method,
        "perplexity": sums.perplexity,
        "cross_entropy_nats": sums.mean_ce,
        "kl_to_teacher": sums.kl,
        "top1_agreement": sums.top1,
        "scored_tokens": sums.num_tokens,
        "prefill_tokens_per_s": prefill_rate,
        "prefill_tokens": prefill_len,
        "decode_tokens_per_s": decode_rate,
        "decode_tokens": cfg.decode_tokens,
        "prompt_tokens": prompt_len,
        "decode_batch_size": cfg.decode_batch_size if batch_rate is not None else None,
        "decode_tokens_per_s_batch": batch_rate,
        # What one decode step reads: the weights as held in memory, and K/V per cached token.
        "loaded_weight_bytes": loaded_bytes,
        "kv_cache_bytes_per_token": kv_cache_bytes_per_token(model.config, _kv_dtype_bytes(model)),
        "device": str(model_device(model)),
        "folder": str(folder) if folder is not None else None,
        **compiled,
    }


def compiled_decode_fields(
    name: str, model: PreTrainedModel, prompt: torch.Tensor, cfg: EvalConfig
) -> dict[str, Any]:
    """Batch-1 compiled decode of one variant (:mod:`distill.evaluate.compiled_decode`), as row fields.

    Empty when ``name`` matches no ``eval.compiled_decode`` pattern. A variant that fails
    to compile, or whose compiled logits differ from its eager ones, gets its error in
    ``decode_compiled_error`` and no rate: the other variants' figures still stand.
    """
    from fnmatch import fnmatchcase

    from distill.evaluate.compiled_decode import (
        METHOD,
        CompiledDecodeError,
        measure_compiled_decode,
    )

    if not any(fnmatchcase(name, pattern) for pattern in cfg.compiled_decode):
        return {}
    fields: dict[str, Any] = {
        "decode_compiled_method": METHOD,
        "decode_compiled_tokens_per_s": None,
        "decode_compiled_compile_s": None,
        "decode_compiled_max_abs_logit_diff": None,
        "decode_compiled_error": None,
    }
    log.info("%s: compiling for decode (tens of seconds on CPU)", name)
    try:
        with torch.inference_mode():
            result = measure_compiled_decode(
                model, prompt.to(model_device(model)), cfg.decode_tokens, cfg.repeats
            )
    except CompiledDecodeError as err:
        log.warning("%s: compiled decode not measured: %s", name, err)
        fields["decode_compiled_error"] = str(err)
        return fields
    fields["decode_compiled_tokens_per_s"] = result.tokens_per_s
    fields["decode_compiled_compile_s"] = result.compile_s
    fields["decode_compiled_max_abs_logit_diff"] = result.max_abs_logit_diff
    return fields


# --------------------------------------------------------------------------------------------
# Report rendering
# --------------------------------------------------------------------------------------------


def human_bytes(value: float | None) -> str:
    """``1234567`` -> ``"1.2 MB"`` (decimal units, as disk sizes are quoted); None -> "—"."""
    if value is None:
        return "—"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value:.0f} B"


def human_count(value: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.1f}{unit}"
    return f"{value:.0f}"


def _num(value: float | None, digits: int, scale: float = 1.0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value * scale:,.{digits}f}"


def format_table(report: dict[str, Any]) -> str:
    """The report's variants as a markdown table: sizes in kB/MB/GB (10^3 steps), perplexity
    to 2 decimals, KL in nats per token, top-1 agreement in percent."""
    lines = [
        "| variant | params | weights | on disk | peak memory | perplexity | KL to teacher "
        "| top-1 agreement | prefill tok/s | decode tok/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for v in report["variants"]:
        lines.append(
            f"| {v['name']} | {human_count(v['params'])} | {human_bytes(v['weight_bytes'])} "
            f"| {human_bytes(v['disk_bytes'])} | {human_bytes(v['peak_memory_bytes'])} "
            f"| {_num(v['perplexity'], 2)} | {_num(v['kl_to_teacher'], 4)} "
            f"| {_num(v['top1_agreement'], 1, 100.0)}% | {_num(v['prefill_tokens_per_s'], 0)} "
            f"| {_num(v['decode_tokens_per_s'], 1)} |"
        )
    return "\n".join(lines)


def format_memory_table(report: dict[str, Any]) -> str:
    """Memory model and decode against the bandwidth bound, one line per variant."""
    variants = report["variants"]
    if not variants or "memory_model" not in variants[0]:
        return ""
    mm0 = variants[0]["memory_model"]
    batch = next((v.get("decode_batch_size") for v in variants if v.get("decode_batch_size")), None)
    total = f"weights + KV ({mm0['batch_size']} x {mm0['context_tokens']} tokens)"
    head = (
        f"| variant | weights | KV / token | {total} | fits budget "
        "| decode b=1 tok/s | bound | of bound |"
    )
    rule = "|---|---:|---:|---:|:---:|---:|---:|---:|"
    if batch:
        head += f" decode b={batch} tok/s | bound | of bound |"
        rule += "---:|---:|---:|"
    compiled = any("decode_compiled_method" in v for v in variants)
    if compiled:
        head += " compiled b=1 tok/s | of bound |"
        rule += "---:|---:|"
    lines = [head, rule]
    for v in variants:
        mm = v["memory_model"]
        fits = {None: "-", True: "yes", False: "**no**"}[mm["fits_budget"]]
        line = (
            f"| {v['name']} | {human_bytes(v['weight_bytes'])} "
            f"| {human_bytes(v['kv_cache_bytes_per_token'])} | {human_bytes(mm['total_bytes'])} "
            f"| {fits} | {_num(v['decode_tokens_per_s'], 1)} "
            f"| {_num(v.get('decode_bound_tokens_per_s'), 1)} "
            f"| {_num(v.get('decode_bound_ratio'), 0, 100.0)}% |"
        )
        if batch:
            line += (
                f" {_num(v.get('decode_tokens_per_s_batch'), 1)} "
                f"| {_num(v.get('decode_bound_tokens_per_s_batch'), 1)} "
                f"| {_num(v.get('decode_bound_ratio_batch'), 0, 100.0)}% |"
            )
        if compiled:
            if v.get("decode_compiled_error"):
                line += " failed (see report.json) | - |"
            elif v.get("decode_compiled_tokens_per_s") is None:
                line += " - | - |"
            else:
                line += (
                    f" {_num(v['decode_compiled_tokens_per_s'], 1)} "
                    f"| {_num(v.get('decode_compiled_bound_ratio'), 0, 100.0)}% |"
                )
        lines.append(line)
    return "\n".join(lines)


def _module_label(entry: Any) -> str:
    # quantize.json lists {"name", "class", "reason"}; accept bare names too.
    if isinstance(entry, dict):
        return f"{entry.get('name')} ({entry.get('reason', 'no reason given')})"
    return str(entry)


def render_markdown(report: dict[str, Any]) -> str:
    variants = report["variants"]
    last = variants[-1] if variants else {}
    lines = [
        "# Evaluation report",
        "",
        format_table(report),
        "",
        f"- Quality on the same {last.get('scored_tokens', 0):,} held-out next-token positions "
        "for every variant. KL is KL(teacher || variant) in nats per position; top-1 agreement "
        "is how often the variant's most likely next token is the teacher's.",
        f"- Peak memory ({last.get('peak_memory_method', 'n/a')}): growth from just before "
        "loading the variant to the end of its evaluation. The teacher is loaded before its "
        "window opens, so its figure is its evaluation growth plus its resident weights.",
        f"- Speed at batch size 1 on {last.get('device', 'n/a')}, medians of the repeats after "
        f"a warm-up: prefill is one forward over {last.get('prefill_tokens', 'n/a')} tokens; "
        f"decode is {last.get('decode_tokens', 'n/a')} greedy new tokens after a "
        f"{last.get('prompt_tokens', 'n/a')}-token prompt, timed over the whole generate call.",
    ]
    memory = format_memory_table(report)
    if memory:
        bw = (report.get("machine") or {}).get("bandwidth_bytes_per_s")
        budget = variants[0]["memory_model"]["budget_bytes"]
        lines += [
            "",
            "## Memory and the bandwidth bound",
            "",
            memory,
            "",
            "- Decoding a token reads every weight once plus the KV cache of every earlier "
            "position, so decode tokens/s <= bandwidth / bytes read per token (x batch, at "
            "batch > 1). Bytes read: the weights as loaded for the timed decode (GGUF files "
            "are loaded dequantized to fp32 here) plus K/V for the mean cached context.",
            f"- Memory copy bandwidth measured here: {_num(bw and bw / 1e9, 1)} GB/s "
            f"({(report.get('machine') or {}).get('bandwidth_method', BANDWIDTH_METHOD)})."
            + (f" Budget: {human_bytes(budget)} (eval.memory_budget_bytes)." if budget else ""),
        ]
        method = next(
            (v["decode_compiled_method"] for v in variants if "decode_compiled_method" in v), None
        )
        if method:
            lines.append(
                "- Compiled decode (variants in eval.compiled_decode): the same greedy decode "
                f"timed with {method}; its logits matched the eager model's on the same tokens "
                "before it was timed. It times the decode steps only; the eager columns time "
                "the whole generate call, prefill included. Eager batch-1 decode on CPU runs "
                "each linear as an MKL matrix-vector product on one core, hence its lower "
                "share of the bound."
            )
    for v in variants:
        if v.get("skipped_modules"):
            kept = ", ".join(_module_label(m) for m in v["skipped_modules"])
            lines.append(f"- {v['name']} leaves these modules in float: {kept}")
    lines.append(f"\n![memory vs quality]({PLOT_PNG})\n")
    return "\n".join(lines)


def plot_memory_vs_quality(report: dict[str, Any], path: Path) -> None:
    """Scatter of weight MB (log x) against perplexity, one labelled point per variant."""
    # The object-oriented API with the Agg canvas: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    fig = Figure(figsize=(7, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for v in report["variants"]:
        x, y = v["weight_bytes"] / MB, v["perplexity"]
        ax.scatter([x], [y], s=40)
        ax.annotate(v["name"], (x, y), textcoords="offset points", xytext=(6, 4), fontsize=9)
    ax.set_xscale("log")
    # Plain numbers (20, 50, 100) instead of 10^x labels: variants often span under a
    # decade, where only minor ticks fall; label the 2x and 5x ones so they do not collide.
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _pos: f"{x:g}"))
    ax.xaxis.set_minor_formatter(
        FuncFormatter(lambda x, _pos: f"{x:g}" if f"{x:.0e}"[0] in "25" else "")
    )
    ax.margins(x=0.15, y=0.12)  # room for the labels of the outermost points
    ax.set_xlabel("weight memory (MB, log scale)")
    ax.set_ylabel("held-out perplexity (lower is better)")
    ax.set_title("Memory vs quality of the distilled variants")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def write_report(report: dict[str, Any], run_dir: Path) -> None:
    """``report.json``, ``report.md`` and ``memory_vs_quality.png`` in ``run_dir``."""
    (run_dir / REPORT_JSON).write_text(json.dumps(report, indent=2, allow_nan=True) + "\n")
    (run_dir / REPORT_MD).write_text(render_markdown(report))
    plot_memory_vs_quality(report, run_dir / PLOT_PNG)


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


def quantize_records(run_dir: Path) -> dict[str, dict[str, Any]]:
    """``quantized/quantize.json`` entries by method (empty when the file is absent)."""
    path = run_dir / "quantized" / "quantize.json"
    if not path.exists():
        return {}
    records = json.loads(path.read_text())
    return {r["method"]: r for r in records if isinstance(r, dict) and "method" in r}


def variant_folders(cfg: PipelineConfig, run_dir: Path) -> list[tuple[str, Path]]:
    """(name, folder) of every saved variant to evaluate, in report order.

    Raises:
        EvalError: ``final/`` is missing.
    """
    final = run_dir / "final"
    if not (final / "config.json").exists():
        raise EvalError(
            f"{final} holds no distilled model: run scripts/distill.py first, or pass "
            "run_dir=<a run with final/>"
        )
    out: list[tuple[str, Path]] = []
    if (run_dir / "student_init" / "config.json").exists():
        out.append(("student_init", run_dir / "student_init"))
    else:
        log.warning("%s/student_init is missing: not evaluated", run_dir)
    out.append(("student", final))
    for method in cfg.quant.methods:
        folder = run_dir / "quantized" / method
        if (folder / "config.json").exists():
            out.append((f"student-{method}", folder))
        else:
            log.warning("%s is missing: run scripts/quantize.py to evaluate it", folder)
    # GGUF files are evaluated through their reloaded (dequantized) form; the path is the file.
    for gguf_type in cfg.quant.gguf:
        path = run_dir / "quantized" / "gguf" / f"student-{gguf_type}.gguf"
        if path.is_file():
            out.append((f"student-gguf-{gguf_type}", path))
        else:
            log.warning("%s is missing: run scripts/quantize.py to evaluate it", path)
    return out


def load_variant(folder: Path, device: torch.device) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    from distill.models.conv1d import load_causal_lm

    # Plain from_pretrained, as a user would: the quantized folders carry their own
    # quantization_config, and safetensors only (no pickle). A .gguf file is dequantized.
    # Folders storing GPT-2's Conv1D as Linear take the one loader that can read them.
    if folder.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(str(folder.parent), gguf_file=folder.name)
    else:
        model = load_causal_lm(folder, use_safetensors=True)
    if model_device(model) != device:
        # Only when it must move: torchao 0.18's unpacked int4 tensor casts its fp16 scales and
        # zero points to fp32 on any .to(), even to the device it is on (+7% bytes measured).
        model = model.to(device)
    return model.eval()


def run(
    cfg: PipelineConfig,
    run_dir: Path,
    *,
    teacher: PreTrainedModel | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    val_blocks: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Evaluate every variant of ``run_dir`` and write the report files there.

    ``teacher``, ``tokenizer`` and ``val_blocks`` (``(N, T)`` int64) may be passed by a
    caller that already holds them; otherwise the teacher is loaded from ``cfg.pair.teacher``
    and the blocks from ``cfg.data``. Saved variants are loaded one at a time and freed after
    their row is written. Every variant runs on the teacher's device (CUDA when available
    for a teacher loaded here). The teacher's ``peak_memory_bytes`` is its evaluation growth
    plus its resident weight bytes, since it is loaded before its window opens.

    Returns:
        ``{"variants": [row, ...], "config": <resolved config>}``, also in ``report.json``.

    Raises:
        EvalError: ``final/`` is missing or there are no held-out blocks.
        ValueError: ``teacher`` given with neither ``tokenizer`` nor ``val_blocks``.
    """
    run_dir = Path(run_dir)
    folders = variant_folders(cfg, run_dir)  # fail before any model loads
    if teacher is not None and tokenizer is None and val_blocks is None:
        raise ValueError("a teacher was passed without its tokenizer or val_blocks: pass one")
    if teacher is None:
        from distill.models.load import load_teacher

        teacher, loaded_tokenizer = load_teacher(cfg.pair.teacher, cache_root(cfg))
        tokenizer = tokenizer if tokenizer is not None else loaded_tokenizer
        if torch.cuda.is_available():
            teacher = teacher.to("cuda")
    device = model_device(teacher)
    if val_blocks is None:
        from distill.data import prepare_data

        assert tokenizer is not None
        val_blocks = prepare_data(cfg.data, tokenizer, cache_root(cfg)).val
    blocks = val_blocks if cfg.eval.max_blocks is None else val_blocks[: cfg.eval.max_blocks]

    # The teacher is already resident (the data preparation needed its tokenizer), so its
    # window starts after loading and its resident weights are added instead.
    reference: list[torch.Tensor] = []
    memory = PeakMemory(device).start()
    row = evaluate_variant(
        "teacher", teacher, blocks, None, cfg.eval, memory=memory, collect=reference
    )
    row["peak_memory_bytes"] += row["weight_bytes"]
    row["peak_memory_method"] += " + resident weight_bytes (teacher loaded before the window)"
    rows = [row]
    teacher_bytes = row["weight_bytes"]
    del teacher  # frees a teacher loaded here; a caller's own reference keeps theirs alive

    records = quantize_records(run_dir)
    for name, folder in folders:
        memory = PeakMemory(device).start()
        try:
            model = load_variant(folder, device)
        except Exception:
            memory.stop()
            raise
        row = evaluate_variant(name, model, blocks, reference, cfg.eval, folder, memory=memory)
        if name.startswith("student-"):
            record = records.get(name.removeprefix("student-"), {})
            row["skipped_modules"] = record.get("skipped_modules")
            row["quant_type"] = record.get("quant_type")
            row["include_embeddings"] = record.get("include_embeddings")
            row["parity"] = record.get("parity")
        if folder.suffix == ".gguf":
            from distill.quantize.gguf import gguf_tensor_bytes

            # transformers dequantizes GGUF on load: count the bytes the file stores instead
            # (loaded_weight_bytes keeps what decoding here reads).
            row["weight_bytes"] = gguf_tensor_bytes(folder)
            row["weight_bytes_source"] = "GGUF file tensor data (transformers loads it dequantized)"
            row["disk_bytes"] = folder.stat().st_size
        rows.append(row)
        del model  # the next window's start() collects it before taking its baseline
    for row in rows:
        row["weight_bytes_ratio_to_teacher"] = row["weight_bytes"] / teacher_bytes
        # Stored weight bytes x 8 / parameters: 32 for fp32, ~8 for int8, 4.5 for Q4_0.
        row["bits_per_weight"] = row["weight_bytes"] * 8 / row["params"]
    del reference
    bandwidth = None
    if cfg.eval.measure_bandwidth:
        # After the timed decodes, so the copy's buffers never compete with them for memory.
        bandwidth = measure_bandwidth(device=device)
        log.info("memory copy bandwidth: %.1f GB/s (read + write)", bandwidth / 1e9)
    for row in rows:
        add_memory_fields(row, cfg.eval, bandwidth)
    # How the student was trained, up front: the full config below holds the same values.
    training = {"teacher_mode": cfg.train.teacher_mode, "loss": asdict(cfg.loss)}
    machine = {
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "bandwidth_bytes_per_s": bandwidth,
        "bandwidth_method": BANDWIDTH_METHOD,
    }
    report = {"variants": rows, "training": training, "machine": machine, "config": asdict(cfg)}
    write_report(report, run_dir)
    return report
