"""Two processes building the same cache under one ``cache_dir`` at once (as two cluster
jobs of a sweep do on shared storage): both succeed, both read the same content a lone
writer makes, and no temporary file is left behind.

Each writer runs in its own spawned process; a barrier releases both together, and the
teacher-cache race repeats over several fresh folders so the window between a temporary
file and its rename is hit more than once. Each writer notes when its write began and ended,
and every test checks that the two writes really ran at the same time (a race that never
overlapped would prove nothing).
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tests.conftest import tiny_llama

ROUNDS = 8


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        h.update(key.encode())
        h.update(tensors[key].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _data_writer(barrier: Any, tok_dir: str, corpus_dir: str, cache_dir: str) -> list[tuple]:
    from transformers import AutoTokenizer

    from distill.config import DataConfig
    from distill.data import prepare_data

    tok = AutoTokenizer.from_pretrained(tok_dir)
    out = []
    for block_size in range(8, 8 + ROUNDS):  # a new cache key each round
        cfg = DataConfig(source="text_files", paths=[f"{corpus_dir}/*.txt"], block_size=block_size)
        barrier.wait()
        start = time.time()
        splits = prepare_data(cfg, tok, Path(cache_dir))
        out.append((_digest({"train": splits.train, "val": splits.val}), start, time.time()))
    return out


def _teacher_cache_writer(barrier: Any, teacher_dir: str, cache_dir: str) -> list[tuple]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.train.teacher_cache import TeacherCache, build_cache, manifest_for

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    blocks = torch.randint(0, len(tok), (6, 9), generator=torch.Generator().manual_seed(0))
    manifest = manifest_for(teacher, tok, blocks, top_k=4, temperature=1.0)
    out = []
    for r in range(ROUNDS):
        path = Path(cache_dir) / f"round-{r}"
        barrier.wait()
        start = time.time()
        build_cache(path, manifest, teacher, blocks, batch_size=2, progress=False)
        end = time.time()
        rows = TeacherCache.open(path, manifest).lookup(list(range(len(blocks))), "cpu")
        out.append((_digest({"lp": rows.logprobs, "ids": rows.ids, "tail": rows.tail}), start, end))
    return out


def _gguf_writer(barrier: Any, gguf_dir: str, cache_dir: str) -> list[tuple]:
    from safetensors.torch import load_file

    from distill.models.load import convert_gguf

    barrier.wait()
    start = time.time()
    folder = convert_gguf(Path(gguf_dir), "teacher.gguf", Path(cache_dir))
    end = time.time()
    return [(str(folder), _digest(load_file(str(folder / "model.safetensors"))), start, end)]


def _child(fn: Callable[..., list[tuple]], barrier: Any, queue: Any, args: tuple) -> None:
    try:
        queue.put(("ok", fn(barrier, *args)))
    except BaseException:  # report it to the parent, which fails the test with it
        queue.put(("error", traceback.format_exc()))
        barrier.abort()  # never leave the other writer waiting


def _race(fn: Callable[..., list[tuple]], *args: str) -> list[list[tuple]]:
    """Run ``fn`` in two spawned processes at once; their results, or the test fails."""
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(2, timeout=120), ctx.Queue()
    procs = [ctx.Process(target=_child, args=(fn, barrier, queue, args)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    errors = [r for kind, r in results if kind == "error"]
    assert not errors, errors[0]
    return [r for _, r in results]


def _contents(rounds: list[tuple]) -> list[tuple]:
    """Each round's result without its (start, end) times."""
    return [r[:-2] for r in rounds]


def _overlapping(a: list[tuple], b: list[tuple]) -> int:
    """How many rounds the two writers were writing at the same moment."""
    return sum(max(x[-2], y[-2]) < min(x[-1], y[-1]) for x, y in zip(a, b, strict=True))


def _leftovers(root: Path) -> list[str]:
    """Temporary and staging names the writers leave when they lose a race badly."""
    marks = (".tmp", ".staging-", ".old-", ".manifest")
    return [str(p) for p in root.rglob("*") if any(m in p.name for m in marks)]


def test_two_processes_build_the_data_cache_at_once(
    tmp_path: Path, tiny_teacher_dir: Path, tiny_corpus_dir: Path
) -> None:
    a, b = _race(_data_writer, str(tiny_teacher_dir), str(tiny_corpus_dir), str(tmp_path))
    assert _overlapping(a, b) >= 1, (a, b)  # the two writes really raced
    assert _contents(a) == _contents(b)
    assert len(list((tmp_path / "data").iterdir())) == ROUNDS  # one folder per key
    (lone,) = _race_free(_data_writer, str(tiny_teacher_dir), str(tiny_corpus_dir), tmp_path)
    assert _contents(lone) == _contents(a)  # read back from the raced cache: what both wrote
    assert not _leftovers(tmp_path)


def test_two_processes_build_the_teacher_cache_at_once(
    tmp_path: Path, tiny_teacher_dir: Path
) -> None:
    a, b = _race(_teacher_cache_writer, str(tiny_teacher_dir), str(tmp_path / "raced"))
    assert _overlapping(a, b) >= 1, (a, b)  # the two writes really raced
    assert _contents(a) == _contents(b)
    (lone,) = _race_free(_teacher_cache_writer, str(tiny_teacher_dir), tmp_path / "lone")
    assert _contents(lone) == _contents(a)
    assert not _leftovers(tmp_path)


def test_two_processes_convert_the_gguf_teacher_at_once(tmp_path: Path, tokenizer) -> None:
    from distill.quantize.gguf import export_gguf

    gguf_dir = tmp_path / "gguf"
    export_gguf(tiny_llama(len(tokenizer), seed=3), tokenizer, gguf_dir / "teacher.gguf", "f16")
    a, b = _race(_gguf_writer, str(gguf_dir), str(tmp_path / "cache"))
    assert _overlapping(a, b) == 1, (a, b)  # the two conversions really raced
    assert _contents(a) == _contents(b)
    (converted,) = list((tmp_path / "cache" / "teachers").iterdir())  # first writer won
    assert str(converted) == a[0][0] and (converted / "COMPLETE").is_file()
    assert not _leftovers(tmp_path / "cache")


def _race_free(fn: Callable[..., list[tuple]], *args: Any) -> list[list[tuple]]:
    """``fn`` once, alone, in this process (a barrier of one party never waits)."""
    import threading

    return [fn(threading.Barrier(1), *[str(a) for a in args])]


def test_a_concurrent_writers_temporary_manifest_is_not_foreign_content(
    tmp_path: Path, tokenizer
) -> None:
    """The moment the two-process race can hit: the other writer has written its temporary
    manifest but not yet linked it into place. The folder is not 'not empty, no manifest'."""
    from distill.train.teacher_cache import MANIFEST, TeacherCache, build_cache, manifest_for

    teacher = tiny_llama(len(tokenizer), seed=1)
    blocks = torch.randint(0, 50, (4, 9), generator=torch.Generator().manual_seed(0))
    manifest = manifest_for(teacher, tokenizer, blocks, top_k=3, temperature=1.0)
    tmp_path.joinpath(f".{MANIFEST}.other-node-4242").write_text("{}")
    assert build_cache(tmp_path, manifest, teacher, blocks, progress=False) == 4
    assert sorted(TeacherCache.open(tmp_path, manifest).index) == [0, 1, 2, 3]
