"""How many tokens the fused output-layer loss takes at once (``anchor/fused_output.py``).

Each chunk holds [chunk, V_local] tensors only: every role's logits in the weights' dtype, the
loss's gradient in the compute dtype (fp32), its copy in the weights' dtype for the two GEMMs
when those differ, and the scratch of the loss passes. The automatic chunk keeps all of them
under one fixed budget, so the peak does not grow with the sequence length. Torch-free, and
imported by nothing heavier, so the memory planner (``planning/activations.py``) uses the same
arithmetic without importing torch.
"""

from __future__ import annotations

# The chunk temporaries' budget. Large enough that each GEMM has a few hundred rows at a
# 64k-column vocabulary shard in bf16 (efficient on GPUs, few collectives per microbatch),
# small next to the logits it replaces (one [8192, 64128] fp32 shard is 1.96 GiB).
CHUNK_BUDGET_BYTES = 256 * 2**20

# Compute-dtype [chunk, V_local] scratch buffers the loss passes hold at once besides the
# gradient: the eager passes' widest option set (prob / JSD with metrics, tau != 1, bf16
# logits; tests/anchor/test_fused_output.py counts them), and the compiled kernels' one. A call
# sizes its chunks by what its own options take (``token_loss.eager_scratch_buffers``: none for
# plain SFT, four for distillation), so that the budget is spent on rows, not on buffers it never
# allocates; the planner keeps the bound.
EAGER_SCRATCH_BUFFERS = 20
COMPILED_SCRATCH_BUFFERS = 1


# Per-token values of the row statistics, losses and metrics a chunk holds besides its [chunk, V]
# tensors (the widest plan keeps about twenty; the rest is headroom).
ROW_VALUES = 64


def bytes_per_token(local_vocab: int, num_roles: int, logits_bytes: int, compiled: bool, compute_bytes: int = 4,
                    scratch_buffers: int | None = None, hidden_size: int = 0) -> int:
    """Bytes of chunk temporaries per token of the chunk. ``scratch_buffers``: what the call's
    passes allocate (``token_loss.eager_scratch_buffers``), else the bound for ``compiled``.
    ``hidden_size``: each role's hidden rows are cast to the weights' dtype chunk by chunk."""
    scratch = scratch_buffers if scratch_buffers is not None else COMPILED_SCRATCH_BUFFERS if compiled else EAGER_SCRATCH_BUFFERS
    per_column = num_roles * logits_bytes + compute_bytes + scratch * compute_bytes
    if logits_bytes != compute_bytes:
        per_column += logits_bytes  # the gradient cast for the GEMMs
    return local_vocab * per_column + num_roles * hidden_size * logits_bytes + ROW_VALUES * compute_bytes


def auto_chunk_tokens(local_vocab: int, num_roles: int, logits_bytes: int, compiled: bool, compute_bytes: int = 4,
                      scratch_buffers: int | None = None, hidden_size: int = 0) -> int:
    """Tokens per chunk so that the temporaries fit ``CHUNK_BUDGET_BYTES`` (at least one)."""
    per_token = bytes_per_token(local_vocab, num_roles, logits_bytes, compiled, compute_bytes, scratch_buffers, hidden_size)
    return max(1, CHUNK_BUDGET_BYTES // per_token)


# The output weight's gradient is summed over chunks in fp32; with lower-precision weights each
# chunk's product comes out of the GEMM in their dtype, one block of vocabulary rows at a time
# so that this temporary stays small next to the weight.
WEIGHT_GRAD_BLOCK_BYTES = 64 * 2**20


def weight_grad_block_rows(hidden_size: int, weight_bytes: int) -> int:
    return max(1, WEIGHT_GRAD_BLOCK_BYTES // (hidden_size * weight_bytes))
