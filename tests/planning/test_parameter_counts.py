"""The planner's per-rank parameter counts equal those of real built models (TP/PP in {1, 2},
interleaved stages, expert parallelism, tied embeddings, qkv bias, qk layernorm, MoE with a
shared expert, a padded vocabulary), and its
per-layer activation estimate is close to what autograd actually saves (measured with
saved-tensor hooks on a shape the estimate was not calibrated on)."""

import dataclasses

import pytest
import torch

from anchored_megatron.config import ModelConfig, ParallelConfig
from anchored_megatron.planning import rank_parameters
from anchored_megatron.planning.activations import layer_activation_bytes

BASE = ModelConfig(num_layers=4, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2, vocab_size=200, seq_length=32)
VARIANTS = {
    "base": BASE,
    "tied_bias_qknorm": dataclasses.replace(BASE, tie_embeddings=True, qkv_bias=True, qk_layernorm=True, kv_channels=24),
    "moe_shared": dataclasses.replace(BASE, num_moe_experts=4, moe_ffn_hidden_size=48, moe_shared_expert_intermediate_size=32),
}
# The expert-parallel layouts build the dense variants too (EP then splits nothing).
LAYOUTS = [ParallelConfig(tp=tp, pp=pp) for tp in (1, 2) for pp in (1, 2)] + [
    ParallelConfig(tp=2, pp=2, vpp=2), ParallelConfig(tp=1, pp=2, ep=2), ParallelConfig(tp=2, ep=2)]
ACTIVATION_SHAPE = ModelConfig(num_layers=2, hidden_size=96, ffn_hidden_size=256, num_attention_heads=6, num_query_groups=2, vocab_size=128, seq_length=48)
ACTIVATION_CASES = [(dtype, tp) for dtype in ("fp32", "bf16") for tp in (1, 2)]
MICRO_BATCH = 3


def saved_bytes_of_one_layer(model: ModelConfig, parallel: ParallelConfig, micro_batch: int) -> int:
    """Bytes of the distinct storages autograd saves in one layer's forward (parameters and
    the layer input excluded), with the trainer's [b, 1, s, s] boolean mask."""
    from anchored_megatron.models.builder import build_model_chunks
    from anchored_megatron.training.roles import unwrap

    gpt = unwrap(build_model_chunks(model, parallel)[0])
    layer = gpt.decoder.layers[0]
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[model.params_dtype]
    s, h = model.seq_length, model.hidden_size
    x = torch.randn(s, micro_batch, h, dtype=dtype, requires_grad=True)
    mask = (~torch.ones(s, s, dtype=torch.bool).tril()).expand(micro_batch, 1, s, s).contiguous()
    storages = {}

    def keep(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        layer(x, attention_mask=mask, rotary_pos_emb=gpt.rotary_pos_emb(s))
    excluded = {p.untyped_storage().data_ptr() for p in layer.parameters()} | {x.untyped_storage().data_ptr()}
    return sum(nbytes for ptr, nbytes in storages.items() if ptr not in excluded)


def measure_rank():
    """On 4 ranks: per-rank parameter counts of every (variant, layout), then saved bytes."""
    from megatron.core import parallel_state

    from anchored_megatron.models import cpu_attention
    from anchored_megatron.models.builder import build_model_chunks
    from anchored_megatron.platform import initialize
    from anchored_megatron.training.roles import unwrap

    # The planner estimates Megatron-Core's own local spec, what a GPU machine runs; without CUDA
    # the builder swaps in SDPA core attention, which saves no s^2 probabilities (this rank only).
    cpu_attention.use_on_this_machine = lambda spec: None
    counts, activations = {}, {}
    for index, parallel in enumerate(LAYOUTS):  # one process-group set-up per layout: they are slow
        initialize(parallel, seed=1)
        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        for variant, model in VARIANTS.items():
            per_chunk = []
            for chunk in build_model_chunks(model, parallel):
                named = dict(unwrap(chunk).named_parameters())
                per_chunk.append({
                    "total": sum(p.numel() for p in named.values()),
                    "embedding": sum(p.numel() for n, p in named.items() if n.startswith("embedding.")),
                    "output_layer": sum(p.numel() for n, p in named.items() if n.startswith("output_layer.")),
                    "experts": sum(p.numel() for n, p in named.items() if ".local_experts." in n),
                })
            counts[(variant, index, pp_rank)] = per_chunk
        if parallel.pp == 1:
            for dtype, tp in ACTIVATION_CASES:
                if tp == parallel.tp:
                    model = dataclasses.replace(ACTIVATION_SHAPE, params_dtype=dtype)
                    activations[(dtype, tp)] = saved_bytes_of_one_layer(model, parallel, MICRO_BATCH)
    return {"counts": counts, "activations": activations}


@pytest.fixture(scope="module")
def measured(ranks):
    return ranks(measure_rank, 4, timeout=400)


@pytest.mark.distributed
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("layout", range(len(LAYOUTS)), ids=[f"tp{p.tp}pp{p.pp}vpp{p.vpp or 1}ep{p.ep}" for p in LAYOUTS])
def test_parameter_counts_per_rank_equal_the_built_model(measured, variant, layout):
    model, parallel = VARIANTS[variant], LAYOUTS[layout]
    for result in measured:
        keys = [key for key in result["counts"] if key[:2] == (variant, layout)]
        assert len(keys) == 1
        pp_rank = keys[0][2]
        planned = rank_parameters(model, parallel, pp_rank)
        built = result["counts"][keys[0]]
        assert [c.total for c in planned] == [c["total"] for c in built]
        assert [c.embedding for c in planned] == [c["embedding"] for c in built]
        assert [c.output_layer for c in planned] == [c["output_layer"] for c in built]
        assert [c.experts for c in planned] == [c["experts"] for c in built]


@pytest.mark.distributed
@pytest.mark.parametrize("dtype,tp", ACTIVATION_CASES)
def test_layer_activation_estimate_is_within_five_percent_of_saved_tensors(measured, dtype, tp):
    model = dataclasses.replace(ACTIVATION_SHAPE, params_dtype=dtype)
    estimate = layer_activation_bytes(model, ParallelConfig(tp=tp), MICRO_BATCH)
    actual = measured[0]["activations"][(dtype, tp)]
    assert abs(estimate - actual) <= 0.05 * actual, (estimate, actual)
