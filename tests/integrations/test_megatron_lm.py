"""The Megatron-LM drop-in driven by Megatron-Core's own 1F1B schedule at TP=2 x PP=2 (4 gloo
ranks, the stack wrapped in Megatron DDP as Megatron-LM's get_model does), against a
single-process TP=1 PP=1 model whose loss is computed in float64 from full-vocab logits: with
the output layer fused into the loss and without, and fused with tied embeddings (the last
stage's copy of the embedding is the output weight; Megatron sums the two copies' gradients)."""

import zlib

import pytest
import torch

from tests.anchor.reference import reference_loss

MODEL = dict(num_layers=4, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2, vocab_size=200, seq_length=16)
ANCHOR = dict(objective="anchored", alpha=0.4, ce_weight=0.2, outer_iterations=2, epochs_per_iteration=1)
MICRO_BATCH, MICROBATCHES = 2, 4
VOCAB_PARAMS = ("embedding.word_embeddings.weight", "output_layer.weight")


def full_tensor(name, shape, role, tied=False):
    """A deterministic full (TP=1) tensor per canonical name and role; vocab rows beyond
    any padding are drawn from one fixed-size table so TP=1 and TP=2 agree on the real rows.
    Tied: the output layer's copy is the embedding."""
    if tied and name == "output_layer.weight":
        name = "embedding.word_embeddings.weight"
    g = torch.Generator().manual_seed(zlib.crc32(f"{role}:{name}".encode()))
    if role == "delta":
        return 0.02 * torch.randn(shape, generator=g)
    if name.endswith("norm.weight") or "layernorm" in name:
        return 1.0 + 0.1 * torch.randn(shape, generator=g)
    if name in VOCAB_PARAMS:
        return 0.3 * torch.randn((256, *shape[1:]), generator=g)[: shape[0]]
    return 0.15 * torch.randn(shape, generator=g)


@torch.no_grad()
def fill(chunk, role, add=False, tied=False):
    from megatron.core import parallel_state

    from anchored_megatron.models.layout import canonical_name, shard
    from anchored_megatron.training.roles import unwrap
    from tests.full_weights import full_shape

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    for local_name, param in unwrap(chunk).named_parameters():
        name = canonical_name(chunk, local_name)
        value = shard(full_tensor(name, tuple(full_shape(param, tp_size)), role, tied), name, param, tp_rank, tp_size)
        param.add_(value) if add else param.copy_(value)


def microbatches():
    g = torch.Generator().manual_seed(7)
    s = MODEL["seq_length"]
    causal = ~torch.ones(s, s, dtype=torch.bool).tril()
    batches = []
    for _ in range(MICROBATCHES):
        loss_mask = (torch.rand(MICRO_BATCH, s, generator=g) < 0.7).float()
        batches.append({
            "tokens": torch.randint(0, MODEL["vocab_size"], (MICRO_BATCH, s), generator=g),
            "labels": torch.randint(0, MODEL["vocab_size"], (MICRO_BATCH, s), generator=g),
            "loss_mask": loss_mask,
            "position_ids": torch.arange(s).expand(MICRO_BATCH, s),
            "attention_mask": causal.expand(MICRO_BATCH, 1, s, s),
        })
    return batches


def dropin_rank(fused: bool, tied: bool):
    """TP=2 x PP=2: the drop-in's provider, forward_step and shape adjustment in Megatron's schedule."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from anchored_megatron.config import AnchorConfig, ModelConfig, ParallelConfig
    from anchored_megatron.integrations.megatron_lm import AnchoredLearning
    from anchored_megatron.models.builder import build_model_chunk
    from anchored_megatron.models.layout import canonical_name
    from anchored_megatron.platform import initialize
    from anchored_megatron.training.roles import unwrap
    from tests.full_weights import gather_full, weights_equal

    parallel = ParallelConfig(tp=2, pp=2)
    initialize(parallel, seed=1)
    model = ModelConfig(**MODEL, tie_embeddings=tied)

    def user_model_provider(pre_process=True, post_process=True, vp_stage=None):
        return build_model_chunk(model, parallel, vp_stage=vp_stage)  # what a user's provider returns

    anchored = AnchoredLearning(AnchorConfig(**ANCHOR), vocab_size=MODEL["vocab_size"], reference=lambda chunk: fill(chunk, "reference", tied=tied),
                                steps_per_iteration=10, current_step=lambda: 0, fused_output_loss=fused, fused_output_chunk_tokens=5 if fused else None)
    stack = anchored.model_provider(user_model_provider)(pre_process=True, post_process=True)
    fill(stack.module, "student", tied=tied)
    anchored.begin_iteration(0)  # snapshot <- student
    fill(stack.module, "delta", add=True, tied=tied)  # the student moves on; the snapshot must not follow
    snapshot_is_copy = not weights_equal([stack.module], [stack.frozen[1]])
    reference_frozen = all(not p.requires_grad for role in stack.frozen for p in role.parameters())

    config = stack.config
    config.calculate_per_token_loss = True
    config.finalize_model_grads_func = finalize_model_grads
    ddp = DistributedDataParallel(config=config, ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True), module=stack)
    config.no_sync_func = ddp.no_sync
    ddp.zero_grad_buffer()
    losses = get_forward_backward_func()(
        forward_step_func=anchored.forward_step,
        data_iterator=iter(microbatches()),
        model=ddp,
        num_microbatches=MICROBATCHES,
        seq_length=MODEL["seq_length"],
        micro_batch_size=MICRO_BATCH,
        adjust_tensor_shapes_fn=anchored.adjust_tensor_shapes_fn(),
    )
    grads = {}
    for local_name, param in unwrap(stack.module).named_parameters():
        name = canonical_name(stack.module, local_name)
        grads[name] = gather_full(param.main_grad, name, param)
    reports = None
    if parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0:
        reports = {key: torch.stack([out[key] for out in losses]).sum(0) for key in losses[0]}
    return {"grads": grads if parallel_state.get_tensor_model_parallel_rank() == 0 else {}, "reports": reports,
            "snapshot_is_copy": snapshot_is_copy, "reference_frozen": reference_frozen, "num_roles": anchored.num_roles}


def reference_rank(tied: bool):
    """TP=1 PP=1, one process: the same weights, the loss in float64 from full-vocab logits."""
    from anchored_megatron.config import ModelConfig, ParallelConfig
    from anchored_megatron.models.builder import build_model_chunks
    from anchored_megatron.platform import initialize

    parallel = ParallelConfig()
    initialize(parallel, seed=1)
    model = ModelConfig(**MODEL, tie_embeddings=tied)
    (student,), (snapshot,), (reference,) = (build_model_chunks(model, parallel) for _ in range(3))
    fill(student, "student")
    fill(student, "delta", add=True)
    fill(snapshot, "student")
    fill(reference, "reference")
    total = torch.zeros((), dtype=torch.float64)
    metric_sums = {"kl_step": 0.0, "kl_reference": 0.0}
    tokens = 0.0
    for batch in microbatches():
        args = (batch["tokens"], batch["position_ids"], batch["attention_mask"])
        with torch.no_grad():
            z_snap, z_ref = snapshot(*args), reference(*args)
        per_token, metrics = reference_loss(student(*args), z_ref, z_snap, alpha=ANCHOR["alpha"], ce_weight=ANCHOR["ce_weight"],
                                            labels=batch["labels"], vocab_size=MODEL["vocab_size"])
        mask = batch["loss_mask"].double()
        total = total + (per_token * mask).sum()
        for key in metric_sums:
            metric_sums[key] += (metrics[key] * mask).sum().item()
        tokens += mask.sum().item()
    (total / tokens).backward()
    grads = {name: p.grad.clone() for name, p in student.named_parameters()}
    if tied:  # the last stage's copy of the embedding must end with the embedding's gradient
        grads["output_layer.weight"] = grads["embedding.word_embeddings.weight"]
    return {"loss": total.item() / tokens, "tokens": tokens, "grads": grads, **{k: v / tokens for k, v in metric_sums.items()}}


@pytest.fixture(scope="module", params=["unfused", "fused", "fused_tied"])
def runs(ranks, request):
    fused, tied = request.param.startswith("fused"), request.param.endswith("tied")
    return ranks(dropin_rank, 4, fused, tied, timeout=600), ranks(reference_rank, 1, tied, timeout=200)[0]


def _merged_grads(results):
    grads = {}
    for result in results:
        grads.update(result["grads"])
    return grads


@pytest.mark.distributed
def test_the_roles_are_set_up_as_described(runs):
    dropin, _ = runs
    assert all(r["snapshot_is_copy"] and r["reference_frozen"] and r["num_roles"] == 3 for r in dropin)


@pytest.mark.distributed
def test_reported_losses_match_the_float64_reference(runs):
    dropin, expected = runs
    (reports,) = [r["reports"] for r in dropin if r["reports"] is not None]
    assert set(reports) == {"lm loss", "kl_step", "kl_bound", "kl_reference", "entropy"}
    assert reports["lm loss"][1].item() == expected["tokens"]
    assert reports["lm loss"][0].item() / expected["tokens"] == pytest.approx(expected["loss"], rel=1e-5)
    assert reports["kl_step"][0].item() / expected["tokens"] == pytest.approx(expected["kl_step"], rel=1e-4)
    assert reports["kl_reference"][0].item() / expected["tokens"] == pytest.approx(expected["kl_reference"], rel=1e-4)


@pytest.mark.distributed
def test_student_grads_match_the_float64_reference(runs):
    dropin, expected = runs
    grads = _merged_grads(dropin)
    assert set(grads) == set(expected["grads"])
    for name, reference in expected["grads"].items():
        actual = grads[name]
        rows = min(actual.shape[0], reference.shape[0]) if name in VOCAB_PARAMS else actual.shape[0]
        actual, reference = actual[:rows], reference[:rows]
        scale = reference.abs().max().item()
        assert scale > 0, name
        assert (actual - reference).abs().max().item() <= 1e-4 * scale, name


@pytest.mark.distributed
def test_padded_vocab_rows_get_no_gradient(runs):
    dropin, _ = runs
    grads = _merged_grads(dropin)
    assert grads["output_layer.weight"][MODEL["vocab_size"]:].abs().max().item() == 0.0
