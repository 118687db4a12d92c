"""The planner's last-stage loss memory against a measurement: real bf16 GPT roles (under
Float16Module, as the trainer builds them), their outputs as they really come out (logits in
fp32, or final hidden states), plus the peak of the tensors the loss creates (LiveBytes)."""

import pytest
import torch

# Logits dominate: one [tokens, V] fp32 tensor is 128 MiB, the unfused passes' scratch ~30 MiB.
SHAPE = dict(num_layers=1, hidden_size=32, ffn_hidden_size=64, num_attention_heads=2, num_query_groups=1, vocab_size=16384, seq_length=1024)
MICRO_BATCH = 2


def loss_memory_rank(fused: bool):
    from anchored_megatron.config import AnchorConfig, ModelConfig, ParallelConfig
    from anchored_megatron.models.builder import build_model_chunks
    from anchored_megatron.planning.activations import loss_activation_bytes
    from anchored_megatron.platform import initialize
    from tests.live_bytes import LiveBytes
    from anchored_megatron.training.forward_step import masked_loss
    from anchored_megatron.training.objectives import iteration_loss
    from anchored_megatron.training.roles import RoleStack, freeze, output_fusion

    parallel = ParallelConfig()
    initialize(parallel, seed=1)
    model = ModelConfig(**SHAPE, params_dtype="bf16", fused_output_loss=fused)
    student, reference, snapshot = (build_model_chunks(model, parallel)[0] for _ in range(3))
    freeze([reference, snapshot])
    stack = RoleStack(student, [reference, snapshot], output_fusion(model))
    g = torch.Generator().manual_seed(0)
    s = SHAPE["seq_length"]
    batch = {"tokens": torch.randint(0, SHAPE["vocab_size"], (MICRO_BATCH, s), generator=g),
             "labels": torch.randint(0, SHAPE["vocab_size"], (MICRO_BATCH, s), generator=g),
             "loss_mask": torch.ones(MICRO_BATCH, s), "position_ids": torch.arange(s).expand(MICRO_BATCH, s),
             "attention_mask": (~torch.ones(s, s, dtype=torch.bool).tril()).expand(MICRO_BATCH, 1, s, s)}
    output = stack(batch["tokens"], batch["position_ids"], batch["attention_mask"])
    frozen = stack.take_frozen_outputs()
    held = sum(t.untyped_storage().nbytes() for t in (output, *frozen))
    with LiveBytes() as meter:
        masked_loss(output, frozen, batch, iteration_loss(AnchorConfig(), 0), SHAPE["vocab_size"], stack.fused_output())
    planned = loss_activation_bytes(model, parallel, MICRO_BATCH, num_roles=3)
    if not fused:  # the output layer's saved input is held by the model's graph, not measured here
        planned -= MICRO_BATCH * s * 2 * SHAPE["hidden_size"]
    return {"output_dtype": output.dtype, "measured": held + meter.peak, "planned": planned}


@pytest.mark.distributed
def test_unfused_logits_are_counted_at_their_real_dtype(ranks):
    # ANCHORED_FUSED_LOSS=0: LiveBytes sees eager code only.
    (result,) = ranks(loss_memory_rank, 1, False, env={"ANCHORED_FUSED_LOSS": "0"})
    assert result["output_dtype"] == torch.float32  # a bf16 model's logits, out of Float16Module
    assert abs(result["planned"] - result["measured"]) <= 0.1 * result["measured"], result


@pytest.mark.distributed
def test_fused_loss_memory_is_bounded_by_the_plan(ranks):
    from anchored_megatron.anchor import chunks as loss_chunks

    (result,) = ranks(loss_memory_rank, 1, True, env={"ANCHORED_FUSED_LOSS": "0"})
    # The plan counts the eager passes' widest scratch; this objective uses fewer buffers.
    slack = loss_chunks.EAGER_SCRATCH_BUFFERS * 4 * SHAPE["vocab_size"] * loss_chunks.auto_chunk_tokens(SHAPE["vocab_size"], 3, 2, compiled=False)
    assert result["measured"] <= result["planned"] <= result["measured"] + slack, result
