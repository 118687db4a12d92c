"""A tiny GPTModel in Megatron-FSDP at DP=2 on gloo against the same model unsharded in one process.

Exercises the platform layer's Megatron-FSDP settings and patches (platform/mcore_compat/fsdp.py).
"""

import zlib

import pytest
import torch
import torch.nn.functional as F

from anchored_megatron.config import ModelConfig, ParallelConfig

MODEL = ModelConfig(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2, vocab_size=128, seq_length=8)
DP, BATCH, SEQ = 2, 4, 8


def _data():
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, MODEL.vocab_size, (BATCH, SEQ + 1), generator=g)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def _model(trainable: bool):
    from anchored_megatron.models.builder import build_model_chunks

    (model,) = build_model_chunks(MODEL, ParallelConfig())
    with torch.no_grad():
        for name, param in model.named_parameters():
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            param.copy_(torch.randn(param.shape, generator=g) * 0.1 + (1.0 if param.dim() == 1 else 0.0))
            param.requires_grad_(trainable)
    return model


def _loss(model, tokens, labels):
    positions = torch.arange(SEQ).unsqueeze(0).expand_as(tokens)
    logits = model(tokens, positions, None)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))


def _fsdp(model):
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.distributed.fsdp.mcore_fsdp_adapter import FullyShardedDataParallel

    from anchored_megatron.platform.mcore_compat import fsdp

    ddp_config = DistributedDataParallelConfig(
        use_megatron_fsdp=True, data_parallel_sharding_strategy="optim_grads_params", use_distributed_optimizer=True,
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, overlap_param_gather=False, check_for_nan_in_grad=False,
        **fsdp.ddp_config_overrides(model, backend=torch.distributed.get_backend()),
    )
    return FullyShardedDataParallel(config=model.config, ddp_config=ddp_config, module=model)


def reference_rank():
    """One process, unsharded: the full-batch loss, its grad norm, and a no-grad forward."""
    from anchored_megatron.platform import initialize

    initialize(ParallelConfig(), seed=1)
    model = _model(trainable=True)
    tokens, labels = _data()
    loss = _loss(model, tokens, labels)
    loss.backward()
    norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters())).item()
    with torch.no_grad():
        frozen_loss = _loss(_model(trainable=False), tokens, labels).item()
    return {"loss": loss.item(), "grad_norm": norm, "frozen_loss": frozen_loss}


def fsdp_rank():
    """DP=2, each rank half the batch: Megatron's optimizer reports the grad norm of the averaged grads."""
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from anchored_megatron.platform import initialize

    initialize(ParallelConfig(), seed=1)
    rank = torch.distributed.get_rank()
    tokens, labels = _data()
    rows = slice(rank * BATCH // DP, (rank + 1) * BATCH // DP)
    unsharded = _model(trainable=True)
    layer_size = sum(p.numel() for p in unsharded.decoder.layers[0].parameters())
    model = _fsdp(unsharded)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-3, clip_grad=1e6, use_distributed_optimizer=True), [model]
    )
    model.zero_grad_buffer()
    optimizer.zero_grad()
    loss = _loss(model, tokens[rows], labels[rows])
    loss.backward()
    finalize_model_grads([model])
    _, grad_norm, _ = optimizer.step()
    mean_loss = loss.detach().clone()
    torch.distributed.all_reduce(mean_loss)

    frozen = _fsdp(_model(trainable=False))
    with torch.no_grad():
        frozen_loss = _loss(frozen, tokens, labels).item()
    return {
        "loss": mean_loss.item() / DP, "grad_norm": grad_norm, "frozen_loss": frozen_loss,
        "layer_size": layer_size, "prefetch_size": model.module.suggested_AG_prefetch_size,
    }


@pytest.fixture(scope="module")
def runs(ranks):
    return ranks(reference_rank, 1)[0], ranks(fsdp_rank, DP)


@pytest.mark.distributed
def test_megatron_fsdp_dp2_grad_norm_equals_the_unsharded_full_batch(runs):
    reference, results = runs
    for result in results:
        assert result["loss"] == pytest.approx(reference["loss"], abs=1e-6)
        assert result["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-5)


@pytest.mark.distributed
def test_a_frozen_model_wraps_in_megatron_fsdp_and_forwards_like_the_unsharded_one(runs):
    reference, results = runs
    for result in results:
        assert result["frozen_loss"] == pytest.approx(reference["frozen_loss"], abs=1e-6)


@pytest.mark.distributed
def test_megatron_fsdp_prefetches_one_layer_ahead_not_the_whole_model(runs):
    _, results = runs
    for result in results:
        # Twice one layer per communication unit, half of it prefetched: exactly one layer.
        assert result["prefetch_size"] == result["layer_size"]
