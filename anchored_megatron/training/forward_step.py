"""Megatron's ``forward_step -> (output, loss_func)`` contract for every objective.

``loss_func(output) -> (loss_sum, num_tokens, {"lm loss": ..., "kl_step": ..., ...})`` follows
Megatron's per-token convention: the schedule sums over microbatches and
``finalize_model_grads`` divides the gradients by the response tokens of the whole global
batch, so the loss is a per-token mean across microbatches and data-parallel ranks.
"""

from __future__ import annotations

from functools import partial

import torch

from anchored_megatron.anchor import fused_output_anchored_loss, vocab_parallel_anchored_loss
from anchored_megatron.training.frozen_cache import PLAN_KEY
from anchored_megatron.training.objectives import IterationLoss
from anchored_megatron.training.roles import FusedOutput, RoleStack

# Order of the packed per-microbatch sums the trainer reduces once per step.
SUM_NAMES = ("loss", "kl_step", "kl_bound", "kl_reference", "entropy", "tokens")
# A replay microbatch's own sums (its SUM_NAMES sums are zero, so that the metrics stay the gold data's).
REPLAY_SUM_NAMES = ("replay_loss", "replay_tokens")
REPLAY_KEY = "replay"  # in a microbatch dict: the microbatch comes from data.replay_paths


def masked_loss(student_output, frozen_outputs: list, batch: dict, terms: IterationLoss, vocab_size: int, fused: FusedOutput | None = None):
    """(loss_sum with grad, packed detached sums of SUM_NAMES) for one microbatch.

    The outputs are each role's vocab-sharded logits, or with ``fused`` its final hidden states
    (the loss then applies the output weights itself). The loss is the objective's main term,
    plus ``terms.base_kl_weight`` KL(p_base || p_theta) when it is set; the metrics come from the
    main term, or from the KL term when the main term has no reference (asft)."""
    mask = batch["loss_mask"]
    term = _fused_term if fused is not None else _logits_term
    loss_sum, metric_sums = term(student_output, frozen_outputs, batch, terms, vocab_size, fused)
    if terms.base_kl_weight > 0.0:
        base = frozen_outputs[terms.base_role]
        kl_sum, kl_metric_sums = term(student_output, {0: base}, batch, terms.base_kl_terms(), vocab_size, fused, base_role=terms.base_role)
        loss_sum = loss_sum + terms.base_kl_weight * kl_sum
        metric_sums = kl_metric_sums if metric_sums is None else metric_sums
    with torch.no_grad():
        if metric_sums is None:  # no reference: the KL metrics are undefined
            metric_sums = [torch.full_like(loss_sum, float("nan"))] * (len(SUM_NAMES) - 2)
        sums = torch.stack([loss_sum.detach(), *(m.to(loss_sum.dtype) for m in metric_sums), mask.sum().to(loss_sum.dtype)]).float()
    return loss_sum, sums


def _logits_term(student_logits, frozen_logits, batch: dict, terms: IterationLoss, vocab_size: int, fused=None, base_role=None):
    """One loss term on logits: (masked sum, masked metric sums or None). ``frozen_logits[0]``
    is the reference (or the base, for the KL-to-base term), ``[1]`` the snapshot."""
    mask = batch["loss_mask"]
    # Without a reference (sft, dft) ce_weight is 1: the divergence term and the metrics are
    # skipped, so the student's own logits only stand in for the argument.
    with_metrics = terms.with_metrics
    reference = frozen_logits[0] if with_metrics else student_logits.detach()
    anchor = frozen_logits[1] if terms.use_snapshot else None
    result = vocab_parallel_anchored_loss(
        student_logits,
        reference,
        anchor,
        labels=batch["labels"],
        vocab_size=vocab_size,
        return_metrics=with_metrics,
        check_labels=False,  # the dataset guarantees the range; the check would sync the host
        **terms.loss_kwargs(),
    )
    per_token, metrics = result if with_metrics else (result, None)
    if terms.label_prob_weight:
        # dft / asft: the CE term alone, each token weighted by sg(p_theta(label)) = exp(-CE_t).
        per_token = per_token * torch.exp(-per_token.detach())
    mask = mask.to(per_token.dtype)
    loss_sum = (per_token * mask).sum() * terms.scale
    if metrics is None:
        return loss_sum, None
    with torch.no_grad():
        return loss_sum, [(metrics[name].to(mask.dtype) * mask).sum() for name in SUM_NAMES[1:-1]]


def _fused_term(student_hidden, frozen_hidden, batch: dict, terms: IterationLoss, vocab_size: int, fused: FusedOutput, base_role=None):
    """One loss term through the fused output layer; ``frozen_hidden`` as in ``_logits_term``
    (the weights are the roles' own: the base's at ``base_role`` for the KL-to-base term)."""
    roles = {}
    with_metrics = terms.with_metrics
    if with_metrics:
        weight_index = 1 + (0 if base_role is None else base_role)
        roles.update(reference_hidden=frozen_hidden[0], reference_weight=fused.weights[weight_index])
    if terms.use_snapshot:
        roles.update(anchor_hidden=frozen_hidden[1], anchor_weight=fused.weights[2])
    result = fused_output_anchored_loss(
        student_hidden,
        fused.weights[0],
        **roles,
        labels=batch["labels"],
        loss_mask=batch["loss_mask"],
        loss_scale=terms.scale,
        vocab_size=vocab_size,
        sequence_parallel=fused.sequence_parallel,
        return_metrics=with_metrics,
        chunk_tokens=fused.chunk_tokens,
        check_labels=False,
        label_prob_weight=terms.label_prob_weight,
        token_rows=batch.get("loss_rows"),
        **terms.loss_kwargs(),
    )
    if not with_metrics:
        return result, None
    loss_sum, metrics = result
    return loss_sum, [metrics[name] for name in SUM_NAMES[1:-1]]


def _loss_func(batch, frozen_outputs, terms, vocab_size, fused, output_tensor):
    if REPLAY_KEY not in batch:
        loss_sum, sums = masked_loss(output_tensor, frozen_outputs, batch, terms, vocab_size, fused)
        return loss_sum, sums[-1].to(torch.int), {"sums": sums, "replay_sums": sums.new_zeros(len(REPLAY_SUM_NAMES))}
    loss_sum, sums = masked_loss(output_tensor, frozen_outputs, batch, terms.replay_terms(), vocab_size, fused)
    # Its tokens count in the per-token mean the gradients are divided by, not in the gold metrics.
    return loss_sum, sums[-1].to(torch.int), {"sums": torch.zeros_like(sums), "replay_sums": sums[[0, -1]]}


def make_forward_step(loss_provider, vocab_size: int):
    """``loss_provider()`` returns the current IterationLoss (it changes at iteration boundaries)."""

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        stack = model if isinstance(model, RoleStack) else None
        if stack is not None:
            stack.next_plan = batch.get(PLAN_KEY)
        output = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"))
        frozen = stack.take_frozen_outputs() if stack is not None else []
        fused = stack.fused_output() if stack is not None else None
        return output, partial(_loss_func, batch, frozen, loss_provider(), vocab_size, fused)

    return forward_step
