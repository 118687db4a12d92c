"""Tensor reshuffles and names, checked against plain loops / Megatron's own modules."""

import torch

from anchored_megatron.config import ModelConfig
from anchored_megatron.convert.mapping import checkpoint_key, interleave_qkv, module_param_name, rules, split_qkv


def _reference_interleave(q, k, v, heads, groups):
    head_dim = q.shape[0] // heads
    rows = []
    for g in range(groups):
        for h in range(g * heads // groups, (g + 1) * heads // groups):
            rows.append(q[h * head_dim:(h + 1) * head_dim])
        rows.append(k[g * head_dim:(g + 1) * head_dim])
        rows.append(v[g * head_dim:(g + 1) * head_dim])
    return torch.cat(rows)


def test_qkv_interleave_matches_a_per_group_loop_for_weights_and_biases():
    heads, groups, head_dim, hidden = 12, 3, 4, 10
    q, k, v = torch.randn(heads * head_dim, hidden), torch.randn(groups * head_dim, hidden), torch.randn(groups * head_dim, hidden)
    assert torch.equal(interleave_qkv(q, k, v, groups), _reference_interleave(q, k, v, heads, groups))
    qb, kb, vb = q[:, 0].clone(), k[:, 0].clone(), v[:, 0].clone()
    assert torch.equal(interleave_qkv(qb, kb, vb, groups), _reference_interleave(qb, kb, vb, heads, groups))


def test_split_qkv_inverts_interleave_bit_exactly():
    heads, groups, head_dim, hidden = 8, 2, 4, 6
    q, k, v = torch.randn(heads * head_dim, hidden), torch.randn(groups * head_dim, hidden), torch.randn(groups * head_dim, hidden)
    back = split_qkv(interleave_qkv(q, k, v, groups), heads, groups)
    assert all(torch.equal(a, b) for a, b in zip(back, [q, k, v]))


def test_module_names_for_local_and_transformer_engine_specs():
    key = "decoder.layers.self_attention.linear_qkv.layer_norm_weight"
    assert module_param_name(key, 3, "local") == "decoder.layers.3.input_layernorm.weight"
    assert module_param_name(key, 3, "transformer_engine") == "decoder.layers.3.self_attention.linear_qkv.layer_norm_weight"
    fc1_norm = "decoder.layers.mlp.linear_fc1.layer_norm_weight"
    assert module_param_name(fc1_norm, 0, "local") == "decoder.layers.0.pre_mlp_layernorm.weight"
    assert module_param_name(fc1_norm, 0, "transformer_engine") == "decoder.layers.0.mlp.linear_fc1.layer_norm_weight"
    assert checkpoint_key("decoder.layers.0.pre_mlp_layernorm.weight") == (fc1_norm, 0)
    assert checkpoint_key("decoder.layers.5.mlp.linear_fc1.layer_norm_weight") == (fc1_norm, 5)
    assert checkpoint_key("embedding.word_embeddings.weight") == ("embedding.word_embeddings.weight", None)


def test_every_local_spec_parameter_is_covered_with_its_sharded_key():
    """Each parameter of a real local-spec model (TP=1, PP=1) is named by exactly one rule,
    and Megatron's own sharded_state_dict gives it the rule's checkpoint key."""
    from anchored_megatron.config import ParallelConfig
    from anchored_megatron.checkpoint.weights import single_process_group
    from anchored_megatron.models.builder import build_model_chunks

    model = ModelConfig(num_layers=2, qkv_bias=True, qk_layernorm=True, vocab_size=100)
    with single_process_group():
        from megatron.core import parallel_state

        parallel_state.initialize_model_parallel()
        try:
            chunk = build_model_chunks(model, ParallelConfig())[0]
            sharded = chunk.sharded_state_dict()
            params = {n for n, _ in chunk.named_parameters()}
        finally:
            parallel_state.destroy_model_parallel()
    named = {}
    for rule in rules(model):
        named.setdefault(module_param_name(rule.key, rule.layer, "local"), set()).add(rule.key)
    assert set(named) == params
    for name, keys in named.items():
        assert {sharded[name].key} == keys, name


def test_a_one_rank_group_leaves_the_exception_hook_as_it_found_it():
    """torch's init_process_group wraps sys.excepthook with a "[rank0]: " prefix: a process that
    converts twice must not print tracebacks with the prefix twice."""
    import sys

    from anchored_megatron.checkpoint.weights import single_process_group

    hook = sys.excepthook
    for _ in range(2):
        with single_process_group():
            pass
    assert sys.excepthook is hook
