"""Packing: every document lands exactly once, intact, with restarting positions and
no targets across document boundaries; the collated masks match a plain reference."""

import collections

import numpy as np
import sentencepiece
import torch

from anchored_megatron.data import DataConfig, build_sft_dataset, collate, load_tokenizer
from anchored_megatron.data.packing import pack_best_fit
from tests.data.conftest import prompt_records, write_jsonl

SEQ = 64


def expected_document(raw, record):
    prompt = [raw.bos_id()] + raw.encode(f"User: {record['prompt']}\n\nAssistant: ")
    response = raw.encode(record["response"]) + [raw.eos_id()]
    return prompt + response, len(prompt)


def split_documents(item):
    docs = collections.defaultdict(list)
    for position, doc in enumerate(item["document_ids"].tolist()):
        if doc >= 0:
            docs[doc].append(position)
    return [docs[d] for d in sorted(docs)]


def test_packed_documents_are_intact_and_isolated(tmp_path, sp_dir):
    records = prompt_records(300, low=1, high=6)
    path = write_jsonl(tmp_path / "d.jsonl", records)
    cfg = DataConfig(paths=[path], tokenizer=sp_dir, packing=True, cache_dir=str(tmp_path / "cache"))
    ds = build_sft_dataset(cfg, load_tokenizer(sp_dir), SEQ)
    raw = sentencepiece.SentencePieceProcessor(model_file=f"{sp_dir}/tokenizer.model")
    expected = collections.Counter()
    prompt_len = {}
    for record in records:
        doc, n_prompt = expected_document(raw, record)
        expected[tuple(doc)] += 1
        prompt_len[tuple(doc)] = n_prompt
    found = collections.Counter()
    used_tokens = 0
    for i in range(len(ds)):
        item = ds[i]
        assert all(item[k].shape == (SEQ,) for k in ("tokens", "labels", "loss_mask", "position_ids", "document_ids"))
        docs = split_documents(item)
        assert len(docs) >= 1
        covered = [p for positions in docs for p in positions]
        assert covered == list(range(len(covered))), "documents are contiguous from position 0"
        assert item["labels"][len(covered):].eq(-100).all() and item["loss_mask"][len(covered):].eq(0).all()
        for positions in docs:
            tokens = item["tokens"][positions].tolist()
            found[tuple(tokens)] += 1
            used_tokens += len(tokens)
            assert item["position_ids"][positions].tolist() == list(range(len(tokens)))
            n_prompt = prompt_len[tuple(tokens)]
            expected_labels = [-100] * (n_prompt - 1) + tokens[n_prompt:] + [-100]
            assert item["labels"][positions].tolist() == expected_labels  # nothing predicted across the boundary
            assert item["loss_mask"][positions].tolist() == [float(t != -100) for t in expected_labels]
    assert found == expected
    assert ds.stats["num_documents"] == len(records) and ds.stats["num_sequences"] == len(ds)
    assert abs(ds.stats["fill_ratio"] - used_tokens / (len(ds) * SEQ)) < 1e-12
    lengths = [len(d) for d in found.elements()]
    lower_bound = max(-(-used_tokens // SEQ), sum(n > SEQ // 2 for n in lengths))
    assert len(ds) <= 11 / 9 * lower_bound + 6 / 9, (len(ds), lower_bound)  # best-fit decreasing's guarantee


def test_best_fit_places_every_index_once_within_capacity():
    rng = np.random.default_rng(0)
    for capacity in (16, 64, 200):
        lengths = rng.integers(1, capacity + 1, size=500)
        bins = pack_best_fit(lengths, capacity)
        placed = sorted(i for b in bins for i in b)
        assert placed == list(range(len(lengths)))
        assert all(int(lengths[b].sum()) <= capacity for b in bins)
        lower_bound = -(-int(lengths.sum()) // capacity)
        big = int((lengths > capacity // 2).sum())  # no two of these share a bin
        assert len(bins) >= max(lower_bound, big)
        assert len(bins) <= 11 / 9 * max(lower_bound, big) + 6 / 9  # best-fit decreasing's guarantee


def test_best_fit_is_deterministic():
    lengths = np.random.default_rng(1).integers(1, 40, size=300)
    assert pack_best_fit(lengths, 64) == pack_best_fit(lengths.copy(), 64)


def reference_attention_mask(document_ids):
    b, s = document_ids.shape
    mask = torch.ones(b, 1, s, s, dtype=torch.bool)
    for row in range(b):
        for q in range(s):
            for k in range(q + 1):
                if document_ids[row, q] == document_ids[row, k]:
                    mask[row, 0, q, k] = False
    return mask


def test_collate_stacks_items_and_masks_across_documents(tmp_path, sp_dir):
    path = write_jsonl(tmp_path / "d.jsonl", prompt_records(40, low=1, high=4))
    cfg = DataConfig(paths=[path], tokenizer=sp_dir, cache_dir=str(tmp_path / "cache"))
    ds = build_sft_dataset(cfg, load_tokenizer(sp_dir), 32)
    items = [ds[i] for i in range(3)]
    batch = collate(items)
    for key in ("tokens", "labels", "loss_mask", "position_ids", "document_ids"):
        assert batch[key].shape == (3, 32) and torch.equal(batch[key][1], items[1][key])
    assert batch["attention_mask"].dtype == torch.bool
    assert torch.equal(batch["attention_mask"], reference_attention_mask(batch["document_ids"]))
    # the flat indices of the response tokens, written out plainly
    expected_rows = [row * 32 + col for row in range(3) for col in range(32) if float(items[row]["loss_mask"][col]) != 0.0]
    assert batch["loss_rows"].dtype == torch.long and batch["loss_rows"].tolist() == expected_rows and expected_rows


def test_mixture_weights_repeat_and_subsample(tmp_path, sp_dir):
    first = prompt_records(20, seed=5)
    second = prompt_records(30, seed=6)
    paths = [write_jsonl(tmp_path / "a.jsonl", first), write_jsonl(tmp_path / "b.jsonl", second)]
    cfg = DataConfig(paths=paths, weights=[2.0, 0.5], tokenizer=sp_dir, packing=False, cache_dir=str(tmp_path / "cache"))
    tok = load_tokenizer(sp_dir)
    ds = build_sft_dataset(cfg, tok, SEQ, seed=3)
    raw = sentencepiece.SentencePieceProcessor(model_file=f"{sp_dir}/tokenizer.model")
    counts = collections.Counter(tuple(ds[i]["tokens"][ds[i]["document_ids"] >= 0].tolist()) for i in range(len(ds)))
    first_docs = [tuple(expected_document(raw, r)[0]) for r in first]
    second_docs = [tuple(expected_document(raw, r)[0]) for r in second]
    assert all(counts[d] == 2 for d in first_docs)
    assert sum(counts[d] for d in second_docs) == 15 and all(counts[d] <= 1 for d in second_docs)
    assert len(ds) == 55 and ds.stats["files"][paths[1]]["documents"] == 15
    # the half is chosen by the seed
    other = build_sft_dataset(cfg, tok, SEQ, seed=4)
    picked = {tuple(other[i]["tokens"][other[i]["document_ids"] >= 0].tolist()) for i in range(len(other))}
    assert picked & set(second_docs) != {d for d in second_docs if counts[d]}
