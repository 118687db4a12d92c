"""What each objective asks of the anchored loss, outer iteration by outer iteration.

All four objectives go through ``vocab_parallel_anchored_loss`` so that padded vocabulary
columns, fp32 reductions and the analytic gradient are handled in one place:

- anchored: alpha_t from the schedule, anchor = snapshot (or the live student).
- distill:  alpha = 1, i.e. KL(p_teacher || p_theta).
- sft_kl:   CE + lambda KL(p_base || p_theta) = (1 + lambda) [(1 - w) KL + w CE] with w = 1 / (1 + lambda).
- sft:      ce_weight = 1 (the divergence term has weight 0).
"""

from __future__ import annotations

from dataclasses import dataclass

from anchored_megatron.anchor.schedules import alpha_at
from anchored_megatron.config import AnchorConfig


@dataclass(frozen=True)
class IterationLoss:
    """The loss settings of one outer iteration."""

    alpha: float
    ce_weight: float
    scale: float
    interpolation: str
    divergence: str
    jsd_beta: float
    temperature: float
    use_snapshot: bool
    has_reference: bool

    def loss_kwargs(self) -> dict:
        return dict(
            alpha=self.alpha,
            interpolation=self.interpolation,
            divergence=self.divergence,
            jsd_beta=self.jsd_beta,
            temperature=self.temperature,
            ce_weight=self.ce_weight,
        )


def iteration_loss(anchor: AnchorConfig, iteration: int) -> IterationLoss:
    common = dict(
        interpolation=anchor.interpolation,
        divergence=anchor.divergence,
        jsd_beta=anchor.jsd_beta,
        temperature=anchor.temperature,
    )
    if anchor.objective == "anchored":
        alpha = alpha_at(iteration, anchor.outer_iterations, anchor.alpha, anchor.alpha_end, anchor.alpha_schedule)
        return IterationLoss(alpha=alpha, ce_weight=anchor.ce_weight, scale=1.0, use_snapshot=anchor.source == "snapshot", has_reference=True, **common)
    if anchor.objective == "distill":
        return IterationLoss(alpha=1.0, ce_weight=anchor.ce_weight, scale=1.0, use_snapshot=False, has_reference=True, **common)
    if anchor.objective == "sft_kl":
        weight = 1.0 / (1.0 + anchor.kl_weight)
        common.update(interpolation="logit", divergence="forward_kl", temperature=1.0)
        return IterationLoss(alpha=1.0, ce_weight=weight, scale=1.0 + anchor.kl_weight, use_snapshot=False, has_reference=True, **common)
    common.update(interpolation="logit", divergence="forward_kl", temperature=1.0)
    return IterationLoss(alpha=1.0, ce_weight=1.0, scale=1.0, use_snapshot=False, has_reference=False, **common)
