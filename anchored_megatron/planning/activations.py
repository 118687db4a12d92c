"""Activation memory per transformer layer per microbatch: a documented estimate.

Counted: the tensors autograd saves for backward in one layer's forward (what 1F1B keeps
per in-flight microbatch). Notation: s sequence, b micro batch, h hidden, a heads, g query
groups, d head dim, F ffn hidden, t tensor-parallel size, beta bytes per parameter element.

Local spec (``get_gpt_layer_local_spec``, torch RMSNorm, unfused attention):
    per token   4 (5 h + 2 d) / t_sp          norm inputs/outputs and residual-side tensors,
                                              held in fp32 by torch RMSNorm even for bf16
              + beta (4 a d + 5 F) / t        q, k and v repeated to a heads (GQA), context,
                                              fc1 output (gate and up), silu(gate), fc2 input
    per row     b (a / t) s^2 (4 + beta')     attention probabilities: fp32 softmax output,
                                              plus its beta-byte cast (beta' = beta for
                                              fp16/bf16, 0 for fp32)
              + b s^2                         the boolean attention mask
    with t_sp = t under sequence parallelism, else 1.
    This is Megatron-Core's local spec as a GPU machine runs it. Without CUDA the builder swaps its
    core attention for PyTorch's SDPA (models/cpu_attention.py), which keeps a log-sum-exp per row
    instead of the probabilities: there the estimate is high by b (a / t) s^2 (4 + beta').
    Calibrated against ``torch.autograd.graph.saved_tensors_hooks`` measurements on CPU (fp32
    and bf16, t = 1 and 2): the TP-split part matched exactly, the rest within 2%;
    tests/planning checks it on another shape.

Transformer Engine spec (flash attention, norms fused into LayerNormLinear; derived, not
calibrated, since the calibration runs on CPU where TE does not):
    per token   beta (4 h / t_sp + ((a + 2 g) d + a d + 5 F) / t) + 4 (2 + a / t)
    no s^2 term (flash attention saves q, k, v, the output and a softmax log-sum-exp only).

MoE layers (derived, not calibrated): the dense MLP's 5 F per token becomes, per token, k
routed copies of beta (5 F_e / t + 2 h) (each copy's expert internals, its permuted input and
unpermuted output) plus the router's fp32 logits and probabilities (8 E), plus 5 S / t for a
shared expert. The all-to-all buffers of one layer (the dispatched and the combined tokens,
2 k h beta per token) are counted once per stage as a transient (``all_to_all_bytes``).

Frozen roles run under ``no_grad``: they save nothing for backward; their working set while
a layer runs is at most one layer's worth, which the planner adds once as "transient".
"""

from __future__ import annotations

from anchored_megatron.config import ModelConfig, ParallelConfig
from anchored_megatron.anchor import chunks as loss_chunks

PARAM_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def layer_activation_bytes(model: ModelConfig, parallel: ParallelConfig, micro_batch_size: int) -> int:
    """Bytes one transformer layer saves for backward for one microbatch on one TP rank."""
    s, b, t = model.seq_length, micro_batch_size, parallel.tp
    h, a, g, d, f = model.hidden_size, model.num_attention_heads, model.num_query_groups, model.head_dim, model.ffn_hidden_size
    beta = PARAM_BYTES[model.params_dtype]
    t_sp = t if parallel.sequence_parallel else 1
    tokens = s * b
    mlp = _mlp_bytes_per_token(model, t)
    if model.transformer_impl == "transformer_engine":
        per_token = beta * (4 * h / t_sp + ((a + 2 * g) * d + a * d) / t) + mlp + 4 * (2 + a / t)
        return int(tokens * per_token)
    per_token = 4 * (5 * h + 2 * d) / t_sp + beta * 4 * a * d / t + mlp
    probs_bytes = 4 + (beta if beta < 4 else 0)
    scores = b * (a / t) * s * s * probs_bytes + b * s * s
    return int(tokens * per_token + scores)


def _mlp_bytes_per_token(model: ModelConfig, t: int) -> float:
    beta = PARAM_BYTES[model.params_dtype]
    if not model.is_moe:
        return beta * 5 * model.ffn_hidden_size / t
    routed = model.moe_router_topk * beta * (5 * model.expert_ffn_hidden_size / t + 2 * model.hidden_size)
    shared = beta * 5 * (model.moe_shared_expert_intermediate_size or 0) / t
    return routed + 8 * model.num_moe_experts + shared


def all_to_all_bytes(model: ModelConfig, micro_batch_size: int) -> int:
    """One MoE layer's token buffers for one microbatch: each token goes to k experts, out and
    back (0 for a dense model). Every rank receives k tokens per token it sends, on average."""
    if not model.is_moe:
        return 0
    beta = PARAM_BYTES[model.params_dtype]
    return 2 * model.seq_length * micro_batch_size * model.moe_router_topk * model.hidden_size * beta


def loss_activation_bytes(model: ModelConfig, parallel: ParallelConfig, micro_batch_size: int, num_roles: int) -> int:
    """Peak of the last stage around the loss for one microbatch.

    Unfused: every role's vocab-sharded logits, fp32 whatever the parameters' dtype
    (``Float16Module`` casts the last stage's output to fp32), plus the loss's fp32 gradient
    buffer of the student's shape, plus the output layer's saved input.
    Fused (``model.fused_output_loss``): ``fused_loss_bytes``."""
    if model.fused_output_loss:
        return fused_loss_bytes(model, parallel, micro_batch_size, num_roles)
    tokens = model.seq_length * micro_batch_size
    beta = PARAM_BYTES[model.params_dtype]
    vocab_local = model.padded_vocab_size(parallel.tp) // parallel.tp
    return tokens * (vocab_local * 4 * (num_roles + 1) + beta * model.hidden_size)


def fused_loss_bytes(model: ModelConfig, parallel: ParallelConfig, micro_batch_size: int, num_roles: int) -> int:
    """The fused output loss's peak for one microbatch (``anchor/fused_output.py``):
    - the chunk temporaries, at most ``loss_chunks.CHUNK_BUDGET_BYTES`` (counted with the eager
      passes' scratch, the larger case, when the sequence is shorter than a chunk);
    - the output weight's gradient, summed over chunks in fp32, plus one block of a chunk's
      product in the weights' dtype when that is lower;
    - every role's final hidden states, fp32 (``Float16Module`` casts the last stage's output),
      gathered over the sequence under sequence parallelism, and the student's hidden-state
      gradient in the weights' dtype."""
    tokens = model.seq_length * micro_batch_size
    beta = PARAM_BYTES[model.params_dtype]
    vocab_local = model.padded_vocab_size(parallel.tp) // parallel.tp
    h = model.hidden_size
    chunk = model.fused_output_chunk_tokens or loss_chunks.auto_chunk_tokens(vocab_local, num_roles, beta, compiled=False, hidden_size=h)
    temporaries = min(tokens, chunk) * loss_chunks.bytes_per_token(vocab_local, num_roles, beta, compiled=False, hidden_size=h)
    weight_grad = vocab_local * h * 4
    if beta < 4:
        weight_grad += min(vocab_local, loss_chunks.weight_grad_block_rows(h, beta)) * h * beta
    gathered = 1 + (1 / parallel.tp if parallel.sequence_parallel else 0)
    hidden = tokens * h * (num_roles * 4 * gathered + beta)
    return int(temporaries + weight_grad + hidden)


def pipeline_buffer_bytes(model: ModelConfig, parallel: ParallelConfig, micro_batch_size: int, num_roles: int, first: bool, last: bool) -> int:
    """Per in-flight microbatch: the received and the sent P2P tensors, each carrying every
    role's hidden state ([s, b, h x roles]), which the schedule holds until backward."""
    if parallel.pp == 1:
        return 0
    beta = PARAM_BYTES[model.params_dtype]
    t_sp = parallel.tp if parallel.sequence_parallel else 1
    one = model.seq_length * micro_batch_size * model.hidden_size * num_roles * beta // t_sp
    return one * ((not first) + (not last))


def in_flight_microbatches(parallel: ParallelConfig, pp_rank: int, num_microbatches: int) -> float:
    """Microbatches whose activations a stage holds at its peak. 1F1B: stage i keeps
    min(pp - i, M); interleaved (Narayanan et al. 2021) costs a factor 1 + (pp - 1) / (pp vpp) more."""
    if parallel.pp == 1:
        return 1
    held = min(parallel.pp - pp_rank, num_microbatches)
    vpp = parallel.vpp or 1
    if vpp > 1:
        held *= 1 + (parallel.pp - 1) / (parallel.pp * vpp)
    return held
