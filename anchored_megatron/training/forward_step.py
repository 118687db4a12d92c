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
from anchored_megatron.training.objectives import IterationLoss
from anchored_megatron.training.roles import FusedOutput, RoleStack

# Order of the packed per-microbatch sums the trainer reduces once per step.
SUM_NAMES = ("loss", "kl_step", "kl_bound", "kl_reference", "entropy", "tokens")


def masked_loss(student_output, frozen_outputs: list, batch: dict, terms: IterationLoss, vocab_size: int, fused: FusedOutput | None = None):
    """(loss_sum with grad, packed detached sums of SUM_NAMES) for one microbatch.

    The outputs are each role's vocab-sharded logits, or with ``fused`` its final hidden states
    (the loss then applies the output weights itself)."""
    mask = batch["loss_mask"]
    if fused is not None:
        loss_sum, metric_sums = _fused_loss(student_output, frozen_outputs, batch, terms, vocab_size, fused)
    else:
        loss_sum, metric_sums = _logits_loss(student_output, frozen_outputs, batch, terms, vocab_size)
    with torch.no_grad():
        if metric_sums is None:  # no reference: the KL metrics are undefined
            metric_sums = [torch.full_like(loss_sum, float("nan"))] * (len(SUM_NAMES) - 2)
        sums = torch.stack([loss_sum.detach(), *(m.to(loss_sum.dtype) for m in metric_sums), mask.sum().to(loss_sum.dtype)]).float()
    return loss_sum, sums


def _logits_loss(student_logits, frozen_logits: list, batch: dict, terms: IterationLoss, vocab_size: int):
    mask = batch["loss_mask"]
    if terms.label_prob_weight:
        # dft / asft: the CE term alone, each token weighted by sg(p_theta(label)) = exp(-CE_t).
        cross_entropy = vocab_parallel_anchored_loss(
            student_logits, student_logits.detach(), labels=batch["labels"], vocab_size=vocab_size,
            check_labels=False, **terms.loss_kwargs())
        weighted = cross_entropy * torch.exp(-cross_entropy.detach())
        loss_sum = (weighted * mask.to(weighted.dtype)).sum() * terms.scale
        if terms.base_kl_weight == 0.0:
            return loss_sum, None
        kl_sum, metric_sums = _logits_divergence(student_logits, frozen_logits, batch, terms, vocab_size, ce_weight=0.0)
        return loss_sum + terms.base_kl_weight * kl_sum, metric_sums
    return _logits_divergence(student_logits, frozen_logits, batch, terms, vocab_size, ce_weight=terms.ce_weight)


def _logits_divergence(student_logits, frozen_logits: list, batch: dict, terms: IterationLoss, vocab_size: int, ce_weight: float):
    # Without a reference (sft) ce_weight is 1: the divergence term and the metrics are skipped,
    # so the student's own logits only stand in for the argument.
    reference = frozen_logits[0] if terms.has_reference else student_logits.detach()
    anchor = frozen_logits[1] if terms.use_snapshot else None
    result = vocab_parallel_anchored_loss(
        student_logits,
        reference,
        anchor,
        labels=batch["labels"],
        vocab_size=vocab_size,
        return_metrics=terms.has_reference,
        check_labels=False,  # the dataset guarantees the range; the check would sync the host
        **{**terms.loss_kwargs(), "ce_weight": ce_weight},
    )
    per_token, metrics = result if terms.has_reference else (result, None)
    mask = batch["loss_mask"].to(per_token.dtype)
    loss_sum = (per_token * mask).sum() * terms.scale
    if metrics is None:
        return loss_sum, None
    with torch.no_grad():
        return loss_sum, [(metrics[name].to(mask.dtype) * mask).sum() for name in SUM_NAMES[1:-1]]


def _fused_loss(student_hidden, frozen_hidden: list, batch: dict, terms: IterationLoss, vocab_size: int, fused: FusedOutput):
    common = dict(labels=batch["labels"], loss_mask=batch["loss_mask"], vocab_size=vocab_size,
                  sequence_parallel=fused.sequence_parallel, chunk_tokens=fused.chunk_tokens, check_labels=False)
    if terms.label_prob_weight:
        # dft / asft: the CE term alone, each token weighted by sg(p_theta(label)).
        loss_sum = fused_output_anchored_loss(student_hidden, fused.weights[0], loss_scale=terms.scale, label_prob_weight=True,
                                              **common, **terms.loss_kwargs())
        if terms.base_kl_weight == 0.0:
            return loss_sum, None
        kl_sum, metric_sums = _fused_divergence(student_hidden, frozen_hidden, terms, fused, common, terms.base_kl_weight, ce_weight=0.0)
        return loss_sum + kl_sum, metric_sums
    return _fused_divergence(student_hidden, frozen_hidden, terms, fused, common, terms.scale, ce_weight=terms.ce_weight)


def _fused_divergence(student_hidden, frozen_hidden: list, terms: IterationLoss, fused: FusedOutput, common: dict, scale: float, ce_weight: float):
    roles = {}
    if terms.has_reference:
        roles.update(reference_hidden=frozen_hidden[0], reference_weight=fused.weights[1])
    if terms.use_snapshot:
        roles.update(anchor_hidden=frozen_hidden[1], anchor_weight=fused.weights[2])
    result = fused_output_anchored_loss(
        student_hidden,
        fused.weights[0],
        **roles,
        **common,
        loss_scale=scale,
        return_metrics=terms.has_reference,
        **{**terms.loss_kwargs(), "ce_weight": ce_weight},
    )
    if not terms.has_reference:
        return result, None
    loss_sum, metrics = result
    return loss_sum, [metrics[name] for name in SUM_NAMES[1:-1]]


def _loss_func(batch, frozen_outputs, terms, vocab_size, fused, output_tensor):
    loss_sum, sums = masked_loss(output_tensor, frozen_outputs, batch, terms, vocab_size, fused)
    return loss_sum, sums[-1].to(torch.int), {"sums": sums}


def make_forward_step(loss_provider, vocab_size: int):
    """``loss_provider()`` returns the current IterationLoss (it changes at iteration boundaries)."""

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"))
        stack = model if isinstance(model, RoleStack) else None
        frozen = stack.take_frozen_outputs() if stack is not None else []
        fused = stack.fused_output() if stack is not None else None
        return output, partial(_loss_func, batch, frozen, loss_provider(), vocab_size, fused)

    return forward_step
