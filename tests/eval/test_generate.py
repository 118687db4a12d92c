"""Greedy generation: with and without the KV cache, TP=2 returns the same tokens as TP=1, and
all equal a plain one-prompt-at-a-time greedy loop over full logits (no padding, no masks,
float64 entropy). Prompts of 1-9 tokens share each batch, so most rows are left-padded."""

import pytest

MODEL = dict(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2,
             vocab_size=50, seq_length=32, make_vocab_size_divisible_by=16)  # padded to 64 at TP=2: 14 padding columns
EOS = 2


def _prompts():
    import random

    rng = random.Random(0)
    return [[rng.randrange(3, 50) for _ in range(rng.randint(1, 9))] for _ in range(13)]


def _reference(chunk, prompts, max_new, max_length):
    """Unbatched greedy decoding from full logits (TP=1)."""
    import torch

    tokens_out, entropies = [], []
    for prompt in prompts:
        seq, generated, ents = list(prompt), [], []
        while len(generated) < max_new and len(seq) < max_length:
            ids = torch.tensor([seq])
            logits = chunk(ids, torch.arange(len(seq)).unsqueeze(0), None)[0, -1, :MODEL["vocab_size"]].double()
            p = logits.softmax(-1)
            ents.append(float(-(p * p.log()).sum()))
            token = int(logits.argmax())
            if token == EOS:
                break
            generated.append(token)
            seq.append(token)
        tokens_out.append(generated)
        entropies.append(sum(ents))
    return tokens_out, entropies


def _check_on_ranks(ckpt_dir):
    import torch

    from anchored_megatron.config import ModelConfig, ParallelConfig
    from anchored_megatron.checkpoint.weights import load_megatron_weights, save_megatron_weights
    from anchored_megatron.eval.generate import greedy_generate
    from anchored_megatron.models.builder import build_model_chunks
    from anchored_megatron.platform import initialize

    model = ModelConfig(**MODEL)
    prompts = _prompts()
    kwargs = dict(eos_id=EOS, vocab_size=MODEL["vocab_size"], max_new_tokens=12, max_length=16, pad_id=0, entropy=True)
    initialize(ParallelConfig(tp=1), seed=3)
    chunks = build_model_chunks(model, ParallelConfig(tp=1))
    with torch.no_grad():  # larger weights than the init: confident, varied continuations
        for p in chunks[0].parameters():
            p.mul_(8.0)
    save_megatron_weights(chunks, ckpt_dir, model)
    chunks[0].eval()
    with torch.no_grad():
        ref_tokens, ref_entropy = _reference(chunks[0], prompts, 12, 16)
    runs = {"tp1": greedy_generate(chunks, prompts, batch_size=5, **kwargs),
            "tp1_nocache": greedy_generate(chunks, prompts, batch_size=5, kv_cache=False, **kwargs)}
    initialize(ParallelConfig(tp=2), seed=3)
    chunks2 = build_model_chunks(model, ParallelConfig(tp=2))
    load_megatron_weights(chunks2, ckpt_dir)
    runs["tp2"] = greedy_generate(chunks2, prompts, batch_size=64, **kwargs)
    runs["tp2_nocache"] = greedy_generate(chunks2, prompts, batch_size=64, kv_cache=False, **kwargs)
    return {"ref": ref_tokens, "ref_entropy": ref_entropy, "finished": runs["tp2"].finished,
            "tokens": {name: gen.tokens for name, gen in runs.items()},
            "entropy": {name: gen.entropy_sums for name, gen in runs.items()}}


@pytest.mark.distributed
def test_cached_and_uncached_generation_at_tp1_and_tp2_equal_an_unbatched_reference(ranks, tmp_path):
    results = ranks(_check_on_ranks, 2, str(tmp_path / "ckpt"))
    for r in results:
        assert len({len(t) for t in r["ref"]}) > 1 or any(r["finished"])  # non-trivial continuations
        assert len({tuple(t) for t in r["ref"]}) > 3
        for name, tokens in r["tokens"].items():
            assert tokens == r["ref"], name
            for a, b in zip(r["ref_entropy"], r["entropy"][name]):
                assert abs(a - b) < 1e-4, name


def test_attention_inputs_hide_padding_and_restart_positions():
    import torch

    from anchored_megatron.eval.generate import _attention_inputs

    positions, mask = _attention_inputs(torch.tensor([2, 0]), 4)
    assert positions.tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]
    visible = ~mask[:, 0]
    # row 0: keys 0-1 are padding; query 3 sees keys 2, 3 only
    assert visible[0, 3].tolist() == [False, False, True, True]
    assert visible[0, 0].tolist() == [True, False, False, False]  # padding sees only itself
    assert visible[1, 2].tolist() == [True, True, True, False]


def test_attention_inputs_for_new_queries_are_the_last_rows_of_the_full_mask():
    import torch

    from anchored_megatron.eval.generate import _attention_inputs

    pad = torch.tensor([3, 0, 1])
    full_positions, full_mask = _attention_inputs(pad, 7)
    for first in (0, 4, 6):  # prefill, a chunk, one decode step
        positions, mask = _attention_inputs(pad, 7, first)
        assert mask.shape == (3, 1, 7 - first, 7)
        assert torch.equal(mask, full_mask[:, :, first:])
        assert torch.equal(positions, full_positions[:, first:])
    assert (~_attention_inputs(pad, 7, 6)[1][0, 0, 0]).tolist() == [False] * 3 + [True] * 4  # pad keys stay hidden
