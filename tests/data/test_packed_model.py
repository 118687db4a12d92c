"""A tiny Megatron model's logits for each document inside a pack equal its logits for
the document alone: no attention across documents, positions as if alone (TP=2, gloo)."""

import pytest
import torch

from anchored_megatron.data import DataConfig, build_sft_dataset, collate, load_tokenizer
from tests.data.conftest import prompt_records, write_jsonl


def packed_vs_alone(batch, documents, tp):
    from anchored_megatron.config import ModelConfig, ParallelConfig
    from anchored_megatron.models.builder import build_model_chunks
    from anchored_megatron.platform import initialize

    parallel = ParallelConfig(tp=tp)
    initialize(parallel, seed=1234)
    model = build_model_chunks(ModelConfig(), parallel)[0]
    model.eval()
    errors, unmasked_errors = [], []
    with torch.no_grad():
        packed = model(batch["tokens"], batch["position_ids"], batch["attention_mask"])  # [b, s, V/tp], this rank's shard
        unmasked = model(batch["tokens"], batch["position_ids"], None)  # plain causal: documents see each other
        for row, start, length in documents:
            tokens = batch["tokens"][row : row + 1, start : start + length]
            alone = model(tokens, torch.arange(length).unsqueeze(0), None)[0]
            errors.append(float((packed[row, start : start + length] - alone).abs().max()))
            unmasked_errors.append(float((unmasked[row, start : start + length] - alone).abs().max()))
    return errors, unmasked_errors, tuple(packed.shape)


@pytest.mark.distributed
def test_packed_logits_equal_documents_alone(tmp_path, sp_dir, ranks):
    path = write_jsonl(tmp_path / "d.jsonl", prompt_records(60, seed=11, low=1, high=5))
    cfg = DataConfig(paths=[path], tokenizer=sp_dir, packing=True, cache_dir=str(tmp_path / "cache"))
    tokenizer = load_tokenizer(sp_dir)
    ds = build_sft_dataset(cfg, tokenizer, 64)  # ModelConfig() defaults: seq_length 64, vocab 256 >= 200
    rows = sorted(range(len(ds)), key=lambda i: -int(ds[i]["document_ids"].max()))[:2]  # the most crowded packs
    batch = collate([ds[i] for i in rows])
    documents = []
    for row in range(len(rows)):
        ids = batch["document_ids"][row]
        for doc in range(int(ids.max()) + 1):
            positions = (ids == doc).nonzero().squeeze(1)
            documents.append((row, int(positions[0]), len(positions)))
    assert len(documents) >= 5 and sum(1 for _, start, _ in documents if start > 0) >= 3
    results = ranks(packed_vs_alone, 2, batch, documents, 2)
    for errors, unmasked_errors, shape in results:
        assert shape == (2, 64, 128)  # vocab 256 sharded over TP=2
        assert max(errors) < 1e-5, errors
        # the check can fail: without the block-diagonal mask, later documents change
        later = [e for e, (_, start, _) in zip(unmasked_errors, documents) if start > 0]
        assert min(later) > 1e-3, later
