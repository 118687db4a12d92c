"""Greedy batched generation through Megatron model chunks at any tensor-parallel size.

Prompts of a batch are left-padded; padding is masked out of attention and position ids
restart at each prompt's first token (rotary embeddings only see relative offsets anyway),
and each row has its own length budget, so a prompt's tokens do not depend on what it is
batched with. The logits stay vocab-sharded: each TP rank finds its shard's best token and
the ranks exchange only (value, index) pairs; ties go to the lowest vocabulary index, as
``torch.argmax`` on full logits would.

Two decoders give the same tokens:
- ``kv_cache=True`` (default): Megatron-Core's static inference path. One prefill forward
  over the padded prompts fills a ``StaticInferenceContext`` (keys/values of every layer,
  batch x (longest prompt + longest budget)); each later step feeds one token per row and
  attends over the cache. Megatron's own static controller avoids padding masks by
  right-padding and forcing the longer prompts' tokens one step at a time; we instead pass
  our own masks, which the local (non-TE) ``DotProductAttention`` applies as given in
  every phase (it ignores ``attn_mask_type``, which the cache path switches to ``no_mask``
  after prefill): [b, 1, s, s] at prefill, [b, 1, 1, kv] per decode step, pad keys masked.
  Rotary slices follow the cache offset (queries ``[offset:offset+n]``, keys ``[:offset+n]``),
  so relative offsets match the uncached forward. The cache holds un-rotated keys, so each
  step re-rotates (and GQA-expands) the cached keys: O(b * s * h) per layer, like attention.
  Not checked with the Transformer Engine spec, whose attention reads ``attn_mask_type``.
  Under sequence parallelism (one token per step cannot be split) the reference is used.
- ``kv_cache=False``: the reference; each new token re-runs the whole batch so far.

Collective: every rank of the model-parallel group calls it with the same prompts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from anchored_megatron.models.layout import unwrap


@dataclass
class Generation:
    tokens: list[list[int]]  # generated ids per prompt, EOS excluded
    finished: list[bool]  # EOS was produced (else cut at max_new_tokens / seq_length)
    entropy_sums: list[float] | None = None  # per prompt: sum of the model's entropy (nats) over its generated positions, EOS step included
    entropy_steps: list[int] | None = None


def _attention_inputs(pad: torch.Tensor, length: int, first: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Position ids [b, q] and the [b, 1, q, length] mask (True = masked) for left-padded rows,
    for the queries at columns ``first..length-1`` (all of them, or the new ones after a cache)."""
    keys = torch.arange(length)
    queries = keys[first:]
    real = keys.unsqueeze(0) >= pad.unsqueeze(1)  # [b, length]
    positions = (queries.unsqueeze(0) - pad.unsqueeze(1)).clamp_(min=0)
    causal = queries.unsqueeze(1) >= keys.unsqueeze(0)  # [q, length]
    visible = causal.unsqueeze(0) & real.unsqueeze(1) & real[:, first:].unsqueeze(2)
    visible |= (queries.unsqueeze(1) == keys.unsqueeze(0)).unsqueeze(0)  # padding sees itself: no empty softmax row
    return positions, (~visible).unsqueeze(1)


class _FullForward:
    """Reference decoder: every call re-runs the whole left-padded batch so far."""

    def __init__(self, model, pad: torch.Tensor, device):
        self.model, self.pad, self.device = model, pad, device

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens`` [b, s] so far -> the last column's local (vocab-sharded) logits [b, V/tp]."""
        positions, mask = _attention_inputs(self.pad, tokens.shape[1])
        logits = self.model(tokens.to(self.device), positions.to(self.device), mask.to(self.device))
        return logits[:, -1, :]


def _keep_vocab_shards(module, args, kwargs):
    return args, {**kwargs, "runtime_gather_output": False}


class _CachedForward:
    """Incremental decoder over Megatron's static KV cache: each call feeds only the columns
    of ``tokens`` not yet cached (all prompt columns first, then one per step)."""

    def __init__(self, model, pad: torch.Tensor, capacity: int, device):
        from megatron.core.inference.contexts import StaticInferenceContext

        # The bare GPTModel: wrappers add nothing here (inputs are ids, logits are cast to
        # fp32 by the caller), and a RoleStack would run its frozen roles into the same cache.
        self.model, self.pad, self.device = unwrap(model), pad, device
        self.context = StaticInferenceContext(max_batch_size=len(pad), max_sequence_length=capacity)
        # Static batching keeps only the last position's hidden state before the output layer.
        self.context.materialize_only_last_token_logits = True

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        first = self.context.sequence_len_offset
        positions, mask = _attention_inputs(self.pad, tokens.shape[1], first)
        # GPTModel asserts runtime_gather_output=True with an inference context (its samplers
        # want full logits); the hook keeps the output layer's vocab shards, as the argmax expects.
        hook = self.model.output_layer.register_forward_pre_hook(_keep_vocab_shards, with_kwargs=True)
        try:
            logits = self.model(tokens[:, first:].to(self.device), positions.to(self.device), mask.to(self.device),
                                inference_context=self.context, runtime_gather_output=True)
        finally:
            hook.remove()
        self.context.increment_sequence_len_offset(tokens.shape[1] - first)
        self.context.enable_decode_mode()
        return logits[:, -1, :]


def _sharded_argmax_and_entropy(local: torch.Tensor, vocab_size: int, want_entropy: bool):
    """``local`` [b, V/tp] fp32 logits of this TP rank -> (global argmax [b], entropy [b] or None)."""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    width = local.shape[-1]
    column = torch.arange(width) + rank * width
    local = local.masked_fill(column >= vocab_size, float("-inf"))  # padded vocabulary rows never win
    value, index = local.max(dim=-1)
    index = index + rank * width
    entropy = None
    if tp > 1:
        group = parallel_state.get_tensor_model_parallel_group()
        values = [torch.empty_like(value) for _ in range(tp)]
        indices = [torch.empty_like(index) for _ in range(tp)]
        torch.distributed.all_gather(values, value, group=group)
        torch.distributed.all_gather(indices, index, group=group)
        best = torch.stack(values).argmax(dim=0)  # first (lowest-rank, so lowest-index) maximum
        index = torch.stack(indices).gather(0, best.unsqueeze(0)).squeeze(0)
        top = torch.stack(values).max(dim=0).values
    else:
        top = value
    if want_entropy:
        shifted = local - top.unsqueeze(-1)
        weights = shifted.exp()
        stats = torch.stack([weights.sum(-1), (weights * shifted.nan_to_num(neginf=0.0)).sum(-1)])
        if tp > 1:
            torch.distributed.all_reduce(stats, group=parallel_state.get_tensor_model_parallel_group())
        entropy = stats[0].log() - stats[1] / stats[0]
    return index, entropy


@torch.no_grad()
def greedy_generate(
    chunks,
    prompts: list[list[int]],
    *,
    eos_id: int,
    vocab_size: int,
    max_new_tokens: int,
    max_length: int,
    pad_id: int = 0,
    batch_size: int = 256,
    entropy: bool = False,
    kv_cache: bool = True,
) -> Generation:
    """Greedy continuation of each prompt (token ids) until EOS, ``max_new_tokens`` or
    ``max_length`` total tokens. ``vocab_size``: the model's true vocabulary (columns past
    it are TP padding). ``kv_cache=False``: the uncached reference decoder (slow)."""
    if len(chunks) != 1:
        raise ValueError(f"greedy_generate needs one model chunk (pipeline parallelism is not supported), got {len(chunks)}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("greedy_generate: empty prompt")
    if any(len(p) >= max_length for p in prompts):
        raise ValueError(f"greedy_generate: a prompt is already max_length={max_length} tokens long")
    model = chunks[0]
    if kv_cache:
        # One decode token per step cannot be split along the sequence across TP ranks.
        kv_cache = not unwrap(model).config.sequence_parallel
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = Generation(tokens=[[] for _ in prompts], finished=[False] * len(prompts))
    if entropy:
        out.entropy_sums, out.entropy_steps = [0.0] * len(prompts), [0] * len(prompts)
    # Sorting by length keeps padding (wasted compute) small inside each batch.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    try:
        for start in range(0, len(order), batch_size):
            members = order[start : start + batch_size]
            _generate_batch(model, [prompts[i] for i in members], members, out, eos_id, vocab_size, max_new_tokens,
                            max_length, pad_id, entropy, device, kv_cache)
    finally:
        model.train(was_training)
    return out


def _generate_batch(model, prompts, members, out, eos_id, vocab_size, max_new_tokens, max_length, pad_id, want_entropy,
                    device, kv_cache):
    longest = max(len(p) for p in prompts)
    pad = torch.tensor([longest - len(p) for p in prompts])
    tokens = torch.tensor([[pad_id] * (longest - len(p)) + list(p) for p in prompts], dtype=torch.long)
    # Each row's own budget, so that a row's output does not depend on its batch companions.
    budget = torch.tensor([min(max_new_tokens, max_length - len(p)) for p in prompts])
    done = budget <= 0
    steps = int(budget.max())
    if kv_cache:  # room for the prompts and every fed-back token of the longest budget
        forward = _CachedForward(model, pad, longest + steps, device)
    else:
        forward = _FullForward(model, pad, device)
    for step in range(steps):
        next_ids, ent = _sharded_argmax_and_entropy(forward(tokens).float().cpu(), vocab_size, want_entropy)
        ent = ent.tolist() if ent is not None else None
        for row, token in enumerate(next_ids.tolist()):
            if done[row]:
                continue
            if ent is not None:
                out.entropy_sums[members[row]] += ent[row]
                out.entropy_steps[members[row]] += 1
            if token == eos_id:
                done[row] = True
                out.finished[members[row]] = True
            else:
                out.tokens[members[row]].append(token)
                if step + 1 >= budget[row]:
                    done[row] = True
        if bool(done.all()):
            break
        tokens = torch.cat([tokens, next_ids.masked_fill(done, pad_id).unsqueeze(1)], dim=1)
