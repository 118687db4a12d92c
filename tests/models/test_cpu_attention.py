"""The CPU core attention (models/cpu_attention.py) against Megatron-Core's own unfused
DotProductAttention: the same model, the same weights, logits and every parameter's gradient
alike, with grouped-query heads and the trainer's packed-document / padding masks."""

import pytest
import torch

from anchored_megatron.config import ModelConfig, ParallelConfig
from anchored_megatron.data.collate import collate

MODEL = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2,
                    vocab_size=128, seq_length=16)


def _batch():
    generator = torch.Generator().manual_seed(0)
    s = MODEL.seq_length
    items = []
    # Two packed documents; one document then padding (its own document id, as the data path gives it).
    for boundary in (6, 11):
        items.append({"tokens": torch.randint(0, MODEL.vocab_size, (s,), generator=generator),
                      "position_ids": torch.cat([torch.arange(boundary), torch.arange(s - boundary)]),
                      "document_ids": torch.cat([torch.zeros(boundary, dtype=torch.long), torch.ones(s - boundary, dtype=torch.long)])})
    return collate(items)


def _logits_and_grads(model, batch):
    model.zero_grad()
    logits = model(batch["tokens"], batch["position_ids"], batch["attention_mask"])
    weights = torch.linspace(-1.0, 1.0, logits.numel()).reshape(logits.shape)
    (logits * weights).sum().backward()
    return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("mask", ["documents", "causal_only"])
def test_sdpa_attention_gives_megatrons_unfused_logits_and_gradients(monkeypatch, mask):
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from anchored_megatron.checkpoint.weights import single_process_group
    from anchored_megatron.models import builder, cpu_attention

    batch = _batch()
    if mask == "causal_only":
        batch["attention_mask"] = None  # Megatron then builds the causal mask itself
    with single_process_group():
        parallel_state.initialize_model_parallel()
        try:
            model_parallel_cuda_manual_seed(0)
            ours = builder.build_model_chunks(MODEL, ParallelConfig())[0]
            layers = list(ours.decoder.layers)
            assert all(type(layer.self_attention.core_attention) is cpu_attention.SdpaDotProductAttention for layer in layers)
            monkeypatch.setattr(cpu_attention, "use_on_this_machine", lambda spec: None)
            megatrons = builder.build_model_chunks(MODEL, ParallelConfig())[0]
            assert all(type(layer.self_attention.core_attention) is DotProductAttention for layer in megatrons.decoder.layers)
            megatrons.load_state_dict(ours.state_dict())
            our_logits, our_grads = _logits_and_grads(ours, batch)
            their_logits, their_grads = _logits_and_grads(megatrons, batch)
        finally:
            parallel_state.destroy_model_parallel()
    torch.testing.assert_close(our_logits, their_logits, rtol=1e-5, atol=1e-5)
    assert our_grads.keys() == their_grads.keys()
    for name in their_grads:
        torch.testing.assert_close(our_grads[name], their_grads[name], rtol=1e-4, atol=1e-5, msg=name)
