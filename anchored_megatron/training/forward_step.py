"""Megatron's ``forward_step -> (output, loss_func)`` contract for every objective.

``loss_func(output) -> (loss_sum, num_tokens, {"lm loss": ..., "kl_step": ..., ...})`` follows
Megatron's per-token convention: the schedule sums over microbatches and
``finalize_model_grads`` divides the gradients by the response tokens of the whole global
batch, so the loss is a per-token mean across microbatches and data-parallel ranks.
"""

from __future__ import annotations

from functools import partial

import torch

from anchored_megatron.anchor import vocab_parallel_anchored_loss
from anchored_megatron.training.objectives import StageLoss
from anchored_megatron.training.roles import RoleStack

# Order of the packed per-microbatch sums the trainer reduces once per step.
SUM_NAMES = ("loss", "kl_step", "kl_bound", "kl_reference", "entropy", "tokens")


def masked_loss(student_logits, frozen_logits: list, batch: dict, stage: StageLoss, vocab_size: int):
    """(loss_sum with grad, packed detached sums of SUM_NAMES) for one microbatch."""
    # Without a reference (sft) ce_weight is 1: the divergence term and the metrics are skipped,
    # so the student's own logits only stand in for the argument.
    reference = frozen_logits[0] if stage.has_reference else student_logits.detach()
    anchor = frozen_logits[1] if stage.use_snapshot else None
    result = vocab_parallel_anchored_loss(
        student_logits,
        reference,
        anchor,
        labels=batch["labels"],
        vocab_size=vocab_size,
        return_metrics=stage.has_reference,
        check_labels=False,  # the dataset guarantees the range; the check would sync the host
        **stage.loss_kwargs(),
    )
    per_token, metrics = result if stage.has_reference else (result, None)
    mask = batch["loss_mask"].to(per_token.dtype)
    loss_sum = (per_token * mask).sum() * stage.scale
    with torch.no_grad():
        if metrics is None:  # no reference: the KL metrics are undefined
            metric_sums = [torch.full_like(loss_sum, float("nan"))] * (len(SUM_NAMES) - 2)
        else:
            metric_sums = [(metrics[name].to(mask.dtype) * mask).sum() for name in SUM_NAMES[1:-1]]
        sums = torch.stack([loss_sum.detach(), *metric_sums, mask.sum()]).float()
    return loss_sum, sums


def _loss_func(batch, frozen_logits, stage, vocab_size, output_tensor):
    loss_sum, sums = masked_loss(output_tensor, frozen_logits, batch, stage, vocab_size)
    return loss_sum, sums[-1].to(torch.int), {"sums": sums}


def make_forward_step(stage_provider, vocab_size: int):
    """``stage_provider()`` returns the current StageLoss (it changes at iteration boundaries)."""

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"))
        frozen = model.take_frozen_logits() if isinstance(model, RoleStack) else []
        return output, partial(_loss_func, batch, frozen, stage_provider(), vocab_size)

    return forward_step
