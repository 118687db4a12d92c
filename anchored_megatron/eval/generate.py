"""Greedy batched generation through Megatron model chunks at any tensor-parallel size.

No KV cache: each new token costs one forward over the sequence so far, which is fine for
the small models of the benchmark. Prompts of a batch are left-padded; padding is masked
out of attention and position ids restart at each prompt's first token (rotary embeddings
only see relative offsets anyway), and each row has its own length budget, so a prompt's
tokens do not depend on what it is batched with. The logits stay vocab-sharded: each TP
rank finds its shard's best token and the ranks exchange only (value, index) pairs; ties
go to the lowest vocabulary index, as ``torch.argmax`` on full logits would.

Collective: every rank of the model-parallel group calls it with the same prompts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Generation:
    tokens: list[list[int]]  # generated ids per prompt, EOS excluded
    finished: list[bool]  # EOS was produced (else cut at max_new_tokens / seq_length)
    entropy_sums: list[float] | None = None  # per prompt: sum of the model's entropy (nats) over its generated positions, EOS step included
    entropy_steps: list[int] | None = None


def _attention_inputs(pad: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Position ids and the [b, 1, s, s] mask (True = masked) for left-padded rows."""
    idx = torch.arange(length)
    real = idx.unsqueeze(0) >= pad.unsqueeze(1)  # [b, s]
    positions = (idx.unsqueeze(0) - pad.unsqueeze(1)).clamp_(min=0)
    causal = idx.unsqueeze(1) >= idx.unsqueeze(0)  # [s(query), s(key)]
    visible = causal.unsqueeze(0) & real.unsqueeze(1) & real.unsqueeze(2)
    visible |= torch.eye(length, dtype=torch.bool).unsqueeze(0)  # padding sees itself: no empty softmax row
    return positions, (~visible).unsqueeze(1)


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
) -> Generation:
    """Greedy continuation of each prompt (token ids) until EOS, ``max_new_tokens`` or
    ``max_length`` total tokens. ``vocab_size``: the model's true vocabulary (columns past
    it are TP padding)."""
    if len(chunks) != 1:
        raise ValueError(f"greedy_generate needs one model chunk (pipeline parallelism is not supported), got {len(chunks)}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("greedy_generate: empty prompt")
    if any(len(p) >= max_length for p in prompts):
        raise ValueError(f"greedy_generate: a prompt is already max_length={max_length} tokens long")
    model = chunks[0]
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
            _generate_batch(model, [prompts[i] for i in members], members, out, eos_id, vocab_size, max_new_tokens, max_length, pad_id, entropy, device)
    finally:
        model.train(was_training)
    return out


def _generate_batch(model, prompts, members, out, eos_id, vocab_size, max_new_tokens, max_length, pad_id, want_entropy, device):
    longest = max(len(p) for p in prompts)
    pad = torch.tensor([longest - len(p) for p in prompts])
    tokens = torch.tensor([[pad_id] * (longest - len(p)) + list(p) for p in prompts], dtype=torch.long)
    # Each row's own budget, so that a row's output does not depend on its batch companions.
    budget = torch.tensor([min(max_new_tokens, max_length - len(p)) for p in prompts])
    done = budget <= 0
    for step in range(int(budget.max())):
        positions, mask = _attention_inputs(pad, tokens.shape[1])
        logits = model(tokens.to(device), positions.to(device), mask.to(device))
        next_ids, ent = _sharded_argmax_and_entropy(logits[:, -1, :].float().cpu(), vocab_size, want_entropy)
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
