"""The method alone: the vocab-parallel anchored loss (on logits, or fused with the output layer)
and the anchor-strength schedules."""

from anchored_megatron.anchor.fused_output import fused_output_anchored_loss
from anchored_megatron.anchor.loss import DIVERGENCES, INTERPOLATIONS, METRIC_NAMES, vocab_parallel_anchored_loss
from anchored_megatron.anchor.schedules import ALPHA_SCHEDULES, alpha_at

__all__ = [
    "ALPHA_SCHEDULES",
    "DIVERGENCES",
    "INTERPOLATIONS",
    "METRIC_NAMES",
    "alpha_at",
    "fused_output_anchored_loss",
    "vocab_parallel_anchored_loss",
]
