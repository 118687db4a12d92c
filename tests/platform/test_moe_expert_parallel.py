"""A tiny MoE GPTModel at expert parallel 2 on two gloo ranks equals one process holding every expert.

Exercises the platform layer's MoE workarounds (platform/mcore_compat/moe.py) and the CPU shim
during backward: the alltoall dispatcher's backward allocates on ``torch.cuda.current_device()``.
"""

import zlib

import pytest
import torch
import torch.nn.functional as F

from anchored_megatron.config import ModelConfig, ParallelConfig

MODEL = ModelConfig(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2, vocab_size=128, seq_length=8)
NUM_EXPERTS, TOPK, EP = 4, 2, 2
BATCH, SEQ = 2, 8


def _batch(rank):
    g = torch.Generator().manual_seed(10 + rank)
    tokens = torch.randint(0, MODEL.vocab_size, (BATCH, SEQ + 1), generator=g)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def _global_name(name: str, first_expert: int) -> str:
    """``local_experts.{i}`` -> the expert's index across all EP ranks."""
    marker = "local_experts."
    if marker not in name:
        return name
    head, tail = name.split(marker)
    index, rest = tail.split(".", 1)
    return f"{head}{marker}{first_expert + int(index)}.{rest}"


def _moe_model(expert_parallel: int):
    """GPTModel with a 4-expert, top-2 MoE MLP in every layer, weights drawn per global name."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    from anchored_megatron.models.builder import transformer_config_kwargs

    config = TransformerConfig(
        **transformer_config_kwargs(MODEL, ParallelConfig()),
        num_moe_experts=NUM_EXPERTS, moe_router_topk=TOPK, expert_model_parallel_size=expert_parallel,
        moe_token_dispatcher_type="alltoall", moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
        moe_grouped_gemm=False,
    )
    spec = get_gpt_layer_local_spec(num_experts=NUM_EXPERTS, moe_grouped_gemm=False, normalization="RMSNorm")
    model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=MODEL.vocab_size, max_sequence_length=SEQ,
                     position_embedding_type="rope", share_embeddings_and_output_weights=False)
    first_expert = parallel_state.get_expert_model_parallel_rank() * (NUM_EXPERTS // expert_parallel)
    names = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            names[name] = _global_name(name, first_expert)
            g = torch.Generator().manual_seed(zlib.crc32(names[name].encode()))
            param.copy_(torch.randn(param.shape, generator=g) * 0.1 + (1.0 if param.dim() == 1 else 0.0))
    return model, names


def _loss_and_grads(model, names, batches):
    model.zero_grad()
    losses = []
    for tokens, labels in batches:
        positions = torch.arange(SEQ).unsqueeze(0).expand_as(tokens)
        logits = model(tokens, positions, None)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))
        loss.backward()
        losses.append(loss.item())
    return losses, {names[n]: p.grad.clone() for n, p in model.named_parameters()}


def _init_expert_parallel(expert_parallel: int):
    from megatron.core import parallel_state

    from anchored_megatron.platform import initialize, seed_everything

    initialize(ParallelConfig(), seed=1)
    # Expert parallelism is not a ParallelConfig option: re-initialise the groups with it.
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(expert_model_parallel_size=expert_parallel)
    seed_everything(1)


def expert_parallel_rank():
    """EP=2: this rank's batch; expert grads sum both ranks' tokens, dense grads this rank's."""
    _init_expert_parallel(EP)
    model, names = _moe_model(EP)
    losses, grads = _loss_and_grads(model, names, [_batch(torch.distributed.get_rank())])
    return losses[0], grads


def single_process_reference():
    """Every expert in one process; each rank's batch separately, dense grads kept per batch."""
    _init_expert_parallel(1)
    model, names = _moe_model(1)
    per_rank = [_loss_and_grads(model, names, [_batch(rank)]) for rank in range(EP)]
    return [loss for (loss,), _ in per_rank], [grads for _, grads in per_rank]


@pytest.mark.distributed
def test_moe_expert_parallel_forward_backward_equals_single_process(ranks):
    ref_losses, ref_grads = ranks(single_process_reference, 1)[0]
    results = ranks(expert_parallel_rank, EP)
    for rank, (loss, grads) in enumerate(results):
        assert loss == pytest.approx(ref_losses[rank], abs=1e-5)
        assert any("local_experts" in name for name in grads)
        for name, grad in grads.items():
            if "local_experts" in name:
                # Tokens of both ranks reach an expert through the all-to-all.
                expected = ref_grads[0][name] + ref_grads[1][name]
            else:
                expected = ref_grads[rank][name]
            err = (grad - expected).abs().max().item()
            assert err <= 1e-5, f"rank {rank} {name}: {err}"
