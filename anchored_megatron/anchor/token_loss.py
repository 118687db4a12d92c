"""The per-token anchored loss, its gradient w.r.t. the student logits and the metrics, for rows
of vocab-sharded logits.

One assembly shared by the two entry points: ``loss`` (logits the caller already holds) and
``fused_output`` (logits made chunk by chunk from hidden states, never held whole). Passes A-C
live in ``vocab_passes`` / ``fused_passes``; this module runs them, merges the statistics across
the tensor-parallel group and turns them into the loss and the metrics.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from anchored_megatron.anchor import fused_passes, vocab_passes
from anchored_megatron.anchor.vocab_passes import LossSpec, ShardLayout, Workspace


@dataclass
class TokenLoss:
    loss: torch.Tensor  # [tokens] in the compute dtype
    metrics: tuple | None  # (kl_step, kl_bound, kl_reference, entropy), [tokens] each, with spec.with_metrics
    fused: bool  # whether the compiled kernels ran (False once they failed to compile)


def compute_dtype(*tensors) -> torch.dtype:
    """float64 when any input is float64 (the tests' reference precision), else float32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def token_loss(sources: dict, spec: LossSpec, layout: ShardLayout, work: Workspace, chunk_tokens: int, fused: bool,
               grad: torch.Tensor | None = None) -> TokenLoss:
    """Loss and metrics of every row of ``sources`` ([tokens, V_local] student / reference /
    anchor logits, [tokens] labels); with ``grad`` ([tokens, V_local], compute dtype) also
    d loss_t / d student logits, written there (0 on padded columns).

    ``fused``: run the compiled kernels (``fused_passes.applies``); a compile failure switches
    this call and every later one to the eager passes.
    """
    plan = vocab_passes.plan_stats(spec)
    if fused:
        try:
            local = fused_passes.local_stats(sources, plan, layout, spec, work, chunk_tokens, keep=grad)
        except fused_passes.compile_errors() as error:
            fused_passes.disable_after_failure(error)
            fused = False
    if not fused:
        local = vocab_passes.local_stats(sources, plan, layout, spec, work, chunk_tokens, keep=grad)
    stats = vocab_passes.merge_stats(vocab_passes.all_slots(local, layout), plan)
    lse, expect = stats.lse, stats.expect
    canon = spec.canon

    def log_z(name):
        return lse[canon(name)]

    def mean(weight, plus, minus=None):
        return expect[(canon(weight), canon(plus), canon(minus) if minus else None)]

    mixture_names = vocab_passes.plan_mixture_sums(spec)
    mixture = {}
    if mixture_names:
        local_mix = vocab_passes.local_mixture_sums(sources, mixture_names, stats, layout, spec, work, chunk_tokens)
        summed = vocab_passes.sum_over_ranks(local_mix, layout)
        mixture = {name: summed[:, i] for i, name in enumerate(mixture_names)}

    num_tokens = sources["student"].shape[0]
    loss = torch.zeros(num_tokens, dtype=work.dtype, device=sources["student"].device)
    divergence_value = kl_p_m = None
    if spec.need_divergence:
        if spec.divergence == "jsd":
            kl_p_m = mixture["kl_p_m"]
            divergence_value = spec.jsd_beta * mixture["kl_q_m"] + (1.0 - spec.jsd_beta) * kl_p_m
        elif spec.interpolation == "prob":
            divergence_value = mixture["forward_prob" if spec.divergence == "forward_kl" else "reverse_prob"]
        elif spec.divergence == "forward_kl":  # KL(q||p) = E_q[a - u] - lse(a) + lse(u)
            divergence_value = mean("a", "a", "u") - log_z("a") + log_z("u")
        else:  # KL(p||q) = E_p[u - a] - lse(u) + lse(a)
            divergence_value = mean("u", "u", "a") - log_z("u") + log_z("a")
        loss = loss + ((1.0 - spec.ce_weight) * spec.temperature**2) * divergence_value
    if spec.need_ce:
        kept = sources["labels"] != spec.ignore_index
        cross_entropy = torch.where(kept, log_z("z") - stats.label_logit, 0.0)
        loss = loss + spec.ce_weight * cross_entropy

    if grad is not None:
        if fused:
            try:
                fused_passes.fill_gradient(grad, local, plan, sources, stats, layout, spec, chunk_tokens)
            except fused_passes.compile_errors() as error:  # raised before the kernel touched grad
                fused_passes.disable_after_failure(error)
                fused = False
        if not fused:
            vocab_passes.fill_gradient(grad, local, plan, sources, stats, divergence_value, kl_p_m, layout, spec, work, chunk_tokens)

    metrics = None
    if spec.with_metrics:
        if spec.interpolation == "logit":
            kl_step = mean("a", "a", "s") - log_z("a") + log_z("s")
            kl_bound = spec.alpha * (mean("r", "r", "s") - mean("s", "r", "s"))
        else:
            kl_step = mixture["step_prob"]
            kl_bound = spec.alpha * (mean("r", "r", "s") - log_z("r") + log_z("s"))
        kl_reference = mean("r", "r", "u") - log_z("r") + log_z("u")
        entropy = log_z("u") - mean("u", "u")
        metrics = (kl_step, kl_bound, kl_reference, entropy)
    return TokenLoss(loss, metrics, fused)


@functools.lru_cache(maxsize=None)
def eager_scratch_buffers(spec: LossSpec, role_dtypes: tuple, dtype: torch.dtype) -> int:
    """How many chunk-sized workspace buffers the eager passes allocate for ``spec`` with the
    logits dtypes of (student, reference, anchor) (None: the role is absent) and compute dtype
    ``dtype``: the divisor of the chunk memory budget (``anchor/chunks.py``). Counted by running
    the passes on a two-token, four-column problem on one rank: which buffers a call takes depends
    on its options and dtypes, never on its sizes or tensor-parallel layout (plain SFT takes none,
    the widest option set twenty)."""
    rows, cols = 2, 4
    generator = torch.Generator().manual_seed(0)
    sources = {role: torch.randn(rows, cols, generator=generator, dtype=torch.float64).to(role_dtype)
               for role, role_dtype in zip(("student", "reference", "anchor"), role_dtypes) if role_dtype is not None}
    sources["labels"] = torch.zeros(rows, dtype=torch.long) if spec.need_ce else None
    layout = ShardLayout(group=None, rank=0, size=1, local_vocab=cols, valid_local=cols, vocab_start=0)
    work = Workspace(rows, cols, dtype, torch.device("cpu"))
    token_loss(sources, spec, layout, work, rows, fused=False, grad=torch.empty(rows, cols, dtype=dtype))
    return len(work._buffers)
