"""Corpus loading, the split, packing, caching and the bad-data messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distill.config import DataConfig
from distill.data import (
    DataError,
    Document,
    batch_indices,
    load_documents,
    pack_documents,
    prepare_data,
    split_documents,
)


def test_pack_joins_documents_with_eos_and_drops_tail(tokenizer) -> None:
    docs = [Document("a", "hello world"), Document("b", "the lazy dog")]
    ids_a = tokenizer("hello world", add_special_tokens=False)["input_ids"]
    ids_b = tokenizer("the lazy dog", add_special_tokens=False)["input_ids"]
    stream = ids_a + [tokenizer.eos_token_id] + ids_b + [tokenizer.eos_token_id]
    blocks = pack_documents(docs, tokenizer, 3)
    assert blocks.shape == (len(stream) // 3, 3)
    assert blocks.flatten().tolist() == stream[: blocks.numel()]


def test_split_is_deterministic_and_disjoint() -> None:
    docs = [Document(f"d{i}", "x" * (10 + i)) for i in range(40)]
    train1, val1 = split_documents(docs, 0.2, seed=0)
    train2, val2 = split_documents(list(reversed(docs)), 0.2, seed=0)
    assert {d.doc_id for d in val1} == {d.doc_id for d in val2}
    assert not {d.doc_id for d in train1} & {d.doc_id for d in val1}
    assert len(train1) + len(val1) == 40
    share = sum(len(d.text) for d in val1) / sum(len(d.text) for d in docs)
    assert 0.1 < share <= 0.2 + 1e-9
    _, val3 = split_documents(docs, 0.2, seed=1)
    assert {d.doc_id for d in val3} != {d.doc_id for d in val1}


def test_single_document_splits_its_text() -> None:
    text = "".join(f"line {i}\n" for i in range(100))
    train, val = split_documents([Document("only", text)], 0.1, seed=0)
    assert train[0].text + val[0].text == text
    assert 0 < len(val[0].text) < len(text) // 5


def test_pydoc_corpus_is_present() -> None:
    docs = load_documents(DataConfig(source="pydoc"))
    assert len(docs) > 50
    assert sum(len(d.text) for d in docs) > 300_000


def test_text_json_and_parquet_files(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("plain text document")
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"body": "first"}) + "\n" + json.dumps({"body": "second"}) + "\n"
    )
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["third", "fourth"]}), tmp_path / "c.parquet")
    docs = load_documents(
        DataConfig(
            source="text_files",
            paths=[str(tmp_path / "b.jsonl"), str(tmp_path / "c.parquet")],
            text_column="body",
        )
    )
    assert [d.text for d in docs] == ["first", "second", "third", "fourth"]
    docs = load_documents(DataConfig(source="text_files", paths=[str(tmp_path / "*.txt")]))
    assert [d.text for d in docs] == ["plain text document"]


def test_bad_data_is_named(tmp_path: Path, tokenizer) -> None:
    with pytest.raises(DataError, match="nothing_here"):
        load_documents(DataConfig(source="text_files", paths=[str(tmp_path / "nothing_here*.txt")]))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="empty.txt"):
        load_documents(DataConfig(source="text_files", paths=[str(tmp_path / "empty.txt")]))
    (tmp_path / "rows.jsonl").write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(DataError, match="'text'.*content"):
        load_documents(DataConfig(source="text_files", paths=[str(tmp_path / "rows.jsonl")]))
    (tmp_path / "short.txt").write_text("tiny text\n" * 3)
    with pytest.raises(DataError, match="data.block_size=512"):
        prepare_data(
            DataConfig(source="text_files", paths=[str(tmp_path / "short.txt")], block_size=512),
            tokenizer,
            None,
        )


def test_prepare_data_caches(tmp_path: Path, tokenizer, tiny_corpus_dir: Path) -> None:
    cfg = DataConfig(
        source="text_files",
        paths=[str(tiny_corpus_dir / "*.txt")],
        block_size=16,
        val_fraction=0.34,
    )
    first = prepare_data(cfg, tokenizer, tmp_path)
    second = prepare_data(cfg, tokenizer, tmp_path)
    assert first.cache_path == second.cache_path and (second.cache_path / "COMPLETE").exists()
    assert torch.equal(first.train, second.train) and torch.equal(first.val, second.val)
    assert first.train.dtype == torch.long and first.train.shape[1] == 16


def test_batch_indices_cover_an_epoch_without_repeats() -> None:
    seen = [i for step in range(5) for i in batch_indices(10, 2, step, seed=3)]
    assert sorted(seen) == list(range(10))
    assert batch_indices(10, 2, 7, seed=3) == batch_indices(10, 2, 7, seed=3)
    assert batch_indices(10, 2, 5, seed=3) != batch_indices(10, 2, 0, seed=3)
