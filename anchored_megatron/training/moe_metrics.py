"""The student's MoE load-balancing loss as a per-step metric (``moe_aux_loss`` in metrics.jsonl).

Megatron-Core's router adds the load-balancing loss to the student's gradients itself and
records its value, before the coefficient, per layer in a process-wide tracker; the frozen
roles run in eval mode, where the router neither applies nor records it. Each step this
rank's tracked values ride along in the trainer's one all-reduce of the step's sums; the
metric is their mean over MoE layers, microbatches and data-parallel replicas.
"""

from __future__ import annotations

import torch

from anchored_megatron.config import ModelConfig

# The tracker's name for each load-balancing type (Megatron-Core's router).
_TRACKED_AS = {"aux_loss": "load_balancing_loss", "seq_aux_loss": "seq_load_balancing_loss"}
METRIC = "moe_aux_loss"


def tracked_name(model: ModelConfig) -> str | None:
    """The tracker entry this student's router writes; None when it applies no load-balancing loss."""
    if not model.is_moe or model.moe_aux_loss_coeff == 0:
        return None
    return _TRACKED_AS.get(model.moe_router_load_balancing_type)


def take_local_sum(name: str, counts_here: bool) -> torch.Tensor:
    """This rank's share of the step's sum (over its layers and microbatches), then clears the
    tracker for the next step. ``counts_here``: False on ranks whose values repeat another
    rank's (tensor-parallel ranks without sequence parallelism see the same tokens)."""
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker

    entry = get_moe_layer_wise_logging_tracker().get(name)
    local = entry["values"].sum() if entry is not None and counts_here else torch.zeros(())
    clear_aux_losses_tracker()
    return local


def step_mean(total: float, model: ModelConfig, data_parallel_size: int, num_microbatches: int) -> float:
    """The all-reduced sum -> the mean per MoE layer, microbatch and data-parallel replica."""
    return total / (model.num_layers * num_microbatches * data_parallel_size)
