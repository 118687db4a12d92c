"""Megatron-Core GPTModel at TP/PP/VPP layouts equals the single-process TP=1 PP=1 model (fp32)."""

from functools import partial

import pytest
import torch
import torch.nn.functional as F

from anchored_megatron.config import ModelConfig, ParallelConfig

MODEL = ModelConfig(num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2, vocab_size=250, seq_length=16)
BATCH, SEQ, MICRO = 8, 16, 2
TOL = 1e-5


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, MODEL.vocab_size, (BATCH, SEQ + 1), generator=g)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def _positions(tokens):
    return torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)


def reference_rank():
    """TP=1 PP=1, one process, the loss written in plain torch on the full batch."""
    from anchored_megatron.models.builder import build_model_chunks
    from anchored_megatron.models.layout import canonical_name
    from anchored_megatron.platform import initialize

    initialize(ParallelConfig(), seed=7)
    (model,) = build_model_chunks(MODEL, ParallelConfig())
    weights = {canonical_name(model, n): p.detach().clone() for n, p in model.named_parameters()}
    tokens, labels = _data()
    logits = model(tokens, _positions(tokens), None)
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))
    loss.backward()
    grads = {canonical_name(model, n): p.grad.detach().clone() for n, p in model.named_parameters()}
    return {"weights": weights, "logits": logits.detach(), "grads": grads, "loss": loss.item()}


def _forward_step(stash, data_iterator, model):
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    tokens, labels = next(data_iterator)
    output = model(tokens, _positions(tokens), None)

    def loss_func(output_tensor):
        stash.append(output_tensor.detach().clone())
        # vocab_parallel_cross_entropy writes into fp32 logits: give it a copy.
        per_token = vocab_parallel_cross_entropy(output_tensor.float().clone(), labels)
        loss = per_token.mean()
        return loss, {"loss": loss.detach()}

    return output, loss_func


def parallel_rank(layouts, weights):
    """Run each layout in turn; return this rank's canonical full grads and (last stage) full logits."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from anchored_megatron.models.builder import build_model_chunks
    from anchored_megatron.models.layout import canonical_name
    from anchored_megatron.platform import initialize
    from tests.full_weights import gather_full, load_full_state

    results = {}
    for layout in layouts:
        parallel = ParallelConfig(**layout)
        initialize(parallel, seed=7)
        chunks = build_model_chunks(MODEL, parallel)
        load_full_state(chunks, weights)
        tokens, labels = _data()
        micro = [(tokens[i : i + MICRO], labels[i : i + MICRO]) for i in range(0, BATCH, MICRO)]
        iterators = [iter(micro) for _ in chunks]
        stash = []
        forward_backward = get_forward_backward_func()
        forward_backward(
            forward_step_func=partial(_forward_step, stash),
            data_iterator=iterators if len(chunks) > 1 else iterators[0],
            model=chunks if len(chunks) > 1 else chunks[0],
            num_microbatches=len(micro),
            seq_length=SEQ,
            micro_batch_size=MICRO,
        )
        grads = {
            canonical_name(chunk, name): gather_full(param.grad, name, param)
            for chunk in chunks
            for name, param in chunk.named_parameters()
        }
        logits = torch.cat([_gather_vocab(s) for s in stash], dim=0) if stash else None
        results[str(layout)] = {
            "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
            "grads": grads,
            "logits": logits,
        }
    return results


def _gather_vocab(logits):
    """Full-vocabulary logits from this TP group's vocab slices (test-only)."""
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    pieces = [torch.empty_like(logits) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(pieces, logits.contiguous(), group=group)
    return torch.cat(pieces, dim=-1)


@pytest.fixture(scope="module")
def reference(ranks):
    return ranks(reference_rank, 1)[0]


def _check_layout(reference, rank_results, layout):
    merged_grads, logits = {}, None
    for result in rank_results:
        r = result[str(layout)]
        if r["tp_rank"] != 0:
            continue
        merged_grads.update(r["grads"])
        if r["logits"] is not None:
            logits = r["logits"]
    assert set(merged_grads) == set(reference["grads"]), f"{layout}: parameters differ"
    assert logits is not None
    logit_err = (logits - reference["logits"]).abs().max().item()
    assert logit_err <= TOL, f"{layout}: logits differ by {logit_err}"
    for name, ref_grad in reference["grads"].items():
        err = (merged_grads[name] - ref_grad).abs().max().item()
        assert err <= TOL, f"{layout}: grad of {name} differs by {err}"


@pytest.mark.distributed
def test_tp2_pp2_and_interleaved_match_single_process(reference, ranks):
    layouts = [dict(tp=2), dict(pp=2), dict(pp=2, vpp=2)]
    results = ranks(parallel_rank, 2, layouts, reference["weights"])
    for layout in layouts:
        _check_layout(reference, results, layout)


@pytest.mark.distributed
def test_tp2_x_pp2_1f1b_matches_single_process(reference, ranks):
    layout = dict(tp=2, pp=2)
    results = ranks(parallel_rank, 4, [layout], reference["weights"])
    _check_layout(reference, results, layout)
