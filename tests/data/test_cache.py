"""The tokenised cache is reused across runs and ranks; rank 0 builds, others wait."""

import os
import threading

import numpy as np
import pytest

from anchored_megatron.data import DataConfig, DataError, build_sft_dataset, load_tokenizer
from tests.data.conftest import prompt_records, write_jsonl

SEQ = 64


def arrays(ds):
    return [np.stack([ds[i][k].numpy() for i in range(len(ds))]) for k in ("tokens", "labels", "loss_mask", "position_ids", "document_ids")]


def test_warm_cache_is_reused_and_invalidated_by_changes(tmp_path, sp_dir):
    path = write_jsonl(tmp_path / "d.jsonl", prompt_records(50, high=4))
    cfg = DataConfig(paths=[path], tokenizer=sp_dir, cache_dir=str(tmp_path / "cache"))
    tok = load_tokenizer(sp_dir)
    cold = build_sft_dataset(cfg, tok, SEQ)
    warm = build_sft_dataset(cfg, tok, SEQ)
    assert cold.stats["cache"] == "built" and warm.stats["cache"] == "loaded"
    assert all(np.array_equal(a, b) for a, b in zip(arrays(cold), arrays(warm)))
    assert build_sft_dataset(cfg, tok, 32).stats["cache"] == "built"  # another seq_length
    write_jsonl(tmp_path / "d.jsonl", prompt_records(51, high=4))
    os.utime(path, ns=(1, 1))  # a different mtime, as a rewrite would give
    changed = build_sft_dataset(cfg, tok, SEQ)
    assert changed.stats["cache"] == "built" and changed.stats["num_documents"] == 51


def run_ranks(target, world_size=2):
    results, errors = {}, {}

    def wrapped(rank):
        try:
            results[rank] = target(rank)
        except Exception as exc:  # noqa: BLE001
            errors[rank] = exc

    threads = [threading.Thread(target=wrapped, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a rank hung"
    return results, errors


def test_rank0_builds_and_others_read(tmp_path, sp_dir):
    path = write_jsonl(tmp_path / "d.jsonl", prompt_records(50, high=4))
    cfg = DataConfig(paths=[path], tokenizer=sp_dir, cache_dir=str(tmp_path / "cache"))
    barrier = threading.Barrier(2)
    results, errors = run_ranks(lambda r: build_sft_dataset(cfg, load_tokenizer(sp_dir), SEQ, rank=r, world_size=2, barrier=barrier.wait))
    assert not errors
    assert results[0].stats["cache"] == "built" and results[1].stats["cache"] == "loaded"
    assert all(np.array_equal(a, b) for a, b in zip(arrays(results[0]), arrays(results[1])))


def test_rank0_build_error_reaches_every_rank(tmp_path, sp_dir):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a"}\n')
    cfg = DataConfig(paths=[str(path)], tokenizer=sp_dir, cache_dir=str(tmp_path / "cache"))
    barrier = threading.Barrier(2)
    _, errors = run_ranks(lambda r: build_sft_dataset(cfg, load_tokenizer(sp_dir), SEQ, rank=r, world_size=2, barrier=barrier.wait))
    assert set(errors) == {0, 1}
    assert str(errors[0]).startswith(f"{path}:1: missing field")
    assert isinstance(errors[1], DataError) and f"{path}:1: missing field" in str(errors[1])


def test_without_barrier_other_ranks_poll(tmp_path, sp_dir):
    path = write_jsonl(tmp_path / "d.jsonl", prompt_records(20))
    cfg = DataConfig(paths=[path], tokenizer=sp_dir, cache_dir=str(tmp_path / "cache"))
    results, errors = run_ranks(lambda r: build_sft_dataset(cfg, load_tokenizer(sp_dir), SEQ, rank=r, world_size=2))
    assert not errors and results[1].stats["cache"] == "loaded" and len(results[1]) == len(results[0])


def test_rank_without_shared_cache_builds_its_own(tmp_path, sp_dir):
    path = write_jsonl(tmp_path / "d.jsonl", prompt_records(20))
    cfg = DataConfig(paths=[path], tokenizer=sp_dir, cache_dir=str(tmp_path / "node1"))
    # rank 0 (on another node) already passed the barrier: nothing in this node's cache dir
    ds = build_sft_dataset(cfg, load_tokenizer(sp_dir), SEQ, rank=1, world_size=2, barrier=lambda: None)
    assert ds.stats["cache"] == "built" and ds.stats["num_documents"] == 20


def test_index_out_of_range(tmp_path, sp_dir):
    path = write_jsonl(tmp_path / "d.jsonl", prompt_records(5))
    ds = build_sft_dataset(DataConfig(paths=[path], tokenizer=sp_dir, cache_dir=str(tmp_path / "c")), load_tokenizer(sp_dir), SEQ)
    with pytest.raises(IndexError):
        ds[len(ds)]
