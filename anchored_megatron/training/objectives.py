"""What each objective asks of the anchored loss, step by step.

Every objective goes through the one anchored loss (``vocab_parallel_anchored_loss`` or its
fused-output form) so that padded vocabulary columns, fp32 reductions and the analytic gradient
are handled in one place:

- anchored: alpha_t from the schedule, anchor = snapshot (or the live student).
- distill:  alpha = 1, i.e. KL(p_teacher || p_theta).
- sft_kl:   CE + lambda KL(p_base || p_theta) = (1 + lambda) [(1 - w) KL + w CE] with w = 1 / (1 + lambda).
- sft:      ce_weight = 1 (the divergence term has weight 0).
- dft:      Dynamic Fine-Tuning, sg(p_theta(y)) CE: sft with each token's loss weighted by the
            detached probability of its label.
- asft:     dft + lambda KL(p_base || p_theta), a second loss term toward the frozen base
            (``base_kl_weight``; the reference role holds the base).
- anchored with ``anchor.base_kl_weight`` > 0: the anchored loss + lambda KL(p_base || p_theta)
            on the same tokens, the base a third frozen role.
- replay microbatches (``data.replay_paths``): KL(p_snapshot || p_theta), i.e. the snapshot alone
            as the anchor (alpha = 0), no teacher (``replay_terms``); for sft (rehearsal, the
            control that tells the trust region from the data) the CE on the replay responses.
- taid:     TAID's interpolated target softmax((1 - t) sg(z_theta) + t z_teacher), i.e. the live
            anchor with alpha = t, and t rising linearly with the optimizer step from ``alpha`` to
            ``alpha_end`` (TAID's schedule without its adaptive momentum term).
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
    label_prob_weight: bool = False  # dft: each token's CE weighted by sg(p_theta(label))
    base_kl_weight: float = 0.0  # + base_kl_weight KL(p_base || p_theta), a second term
    base_role: int = 0  # which frozen output is the base's (asft: the reference's)

    @property
    def with_metrics(self) -> bool:
        """Whether the term's loss call reports the KL metrics (it has a reference and a divergence)."""
        return self.has_reference and not self.label_prob_weight

    def _plain_kl(self, alpha: float, use_snapshot: bool) -> "IterationLoss":
        return IterationLoss(alpha=alpha, ce_weight=0.0, scale=1.0, interpolation="logit", divergence="forward_kl", jsd_beta=self.jsd_beta,
                             temperature=1.0, use_snapshot=use_snapshot, has_reference=True)

    def base_kl_terms(self) -> "IterationLoss":
        """The second term's settings: KL(p_base || p_theta) at temperature 1, the base in the
        reference's place (alpha = 1)."""
        return self._plain_kl(alpha=1.0, use_snapshot=False)

    def replay_terms(self) -> "IterationLoss":
        """A replay microbatch's settings: KL(p_snapshot || p_theta) at temperature 1 (alpha = 0)
        with a snapshot; without one (sft, the only other objective validation lets replay) sft's
        own terms, the plain CE on the replay responses."""
        return self._plain_kl(alpha=0.0, use_snapshot=True) if self.use_snapshot else self

    def loss_kwargs(self) -> dict:
        return dict(
            alpha=self.alpha,
            interpolation=self.interpolation,
            divergence=self.divergence,
            jsd_beta=self.jsd_beta,
            temperature=self.temperature,
            ce_weight=self.ce_weight,
        )


def taid_t(anchor: AnchorConfig, step: int, total_steps: int) -> float:
    """TAID's t before optimizer step ``step`` (0-based) of ``total_steps``: ``alpha`` at the
    first, ``alpha_end`` (default 1) at the last, linear in between."""
    end = 1.0 if anchor.alpha_end is None else anchor.alpha_end
    if total_steps <= 1:
        return float(anchor.alpha)
    return float(anchor.alpha) + (float(end) - float(anchor.alpha)) * min(step, total_steps - 1) / (total_steps - 1)


def iteration_loss(anchor: AnchorConfig, iteration: int, step: int = 0, total_steps: int = 1) -> IterationLoss:
    """The loss settings at outer iteration ``iteration``; taid's also depend on the optimizer
    step (``step`` of ``total_steps``)."""
    common = dict(
        interpolation=anchor.interpolation,
        divergence=anchor.divergence,
        jsd_beta=anchor.jsd_beta,
        temperature=anchor.temperature,
    )
    if anchor.objective == "anchored":
        alpha = alpha_at(iteration, anchor.outer_iterations, anchor.alpha, anchor.alpha_end, anchor.alpha_schedule)
        return IterationLoss(alpha=alpha, ce_weight=anchor.ce_weight, scale=1.0, use_snapshot=anchor.source == "snapshot", has_reference=True,
                             base_kl_weight=anchor.base_kl_weight, base_role=anchor.frozen_roles.index("base") if anchor.needs_base else 0,
                             **common)
    if anchor.objective == "taid":
        common.update(interpolation="logit", divergence="forward_kl", temperature=1.0)
        return IterationLoss(alpha=taid_t(anchor, step, total_steps), ce_weight=0.0, scale=1.0, use_snapshot=False, has_reference=True, **common)
    if anchor.objective == "distill":
        return IterationLoss(alpha=1.0, ce_weight=anchor.ce_weight, scale=1.0, use_snapshot=False, has_reference=True, **common)
    if anchor.objective == "sft_kl":
        weight = 1.0 / (1.0 + anchor.kl_weight)
        common.update(interpolation="logit", divergence="forward_kl", temperature=1.0)
        return IterationLoss(alpha=1.0, ce_weight=weight, scale=1.0 + anchor.kl_weight, use_snapshot=False, has_reference=True, **common)
    common.update(interpolation="logit", divergence="forward_kl", temperature=1.0)
    if anchor.objective == "asft":
        return IterationLoss(alpha=1.0, ce_weight=1.0, scale=1.0, use_snapshot=False, has_reference=True,
                             label_prob_weight=True, base_kl_weight=anchor.kl_weight, **common)
    return IterationLoss(alpha=1.0, ce_weight=1.0, scale=1.0, use_snapshot=False, has_reference=False,
                         label_prob_weight=anchor.objective == "dft", **common)
