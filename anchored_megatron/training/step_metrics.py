"""One step's metrics from its microbatches' sums, with one all-reduce.

Each microbatch's loss function returns its ``SUM_NAMES`` and ``REPLAY_SUM_NAMES`` sums
(``forward_step.py``). The last stage's TP-rank-0 of each data-parallel replica contributes
them, every stage its layers' MoE load-balancing losses; after the all-reduce every rank holds
the same metrics, so any rank may log them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from anchored_megatron.config import AnchorConfig, ModelConfig
from anchored_megatron.training import moe_metrics
from anchored_megatron.training.forward_step import REPLAY_SUM_NAMES, SUM_NAMES


def metric_names(anchor: AnchorConfig) -> tuple[str, ...]:
    """The per-token means a step reports."""
    # Without a reference (sft) there is no divergence: its metrics would be undefined.
    return SUM_NAMES[:-1] if anchor.needs_reference else ("loss",)


@dataclass(frozen=True)
class StepSums:
    """A step's sums over every microbatch and data-parallel replica (float64, on the host)."""

    gold: torch.Tensor  # the SUM_NAMES sums
    replay: torch.Tensor  # the REPLAY_SUM_NAMES sums
    moe_aux_loss: float | None  # the student's load-balancing loss, a mean (moe_metrics); None without one

    @property
    def finite(self) -> bool:
        return bool(torch.isfinite(self.gold[0]).item()) and bool(torch.isfinite(self.replay[0]).item())

    def metrics(self, names: tuple[str, ...]) -> dict:
        """The per-token means of ``names``, the load-balancing loss and the response tokens."""
        tokens = max(self.gold[-1].item(), 1.0)
        record = {name: (self.gold[SUM_NAMES.index(name)] / tokens).item() for name in names}
        if self.moe_aux_loss is not None:
            record[moe_metrics.METRIC] = self.moe_aux_loss
        record["response_tokens"] = int(self.gold[-1].item())
        return record

    def replay_metrics(self) -> dict:
        return {"replay_loss": (self.replay[0] / max(self.replay[1].item(), 1.0)).item(), "replay_tokens": int(self.replay[1].item())}


def reduce_sums(outputs: list[dict], model: ModelConfig, sequence_parallel: bool, data_parallel_size: int,
                num_microbatches: int, device) -> StepSums:
    """The schedule's per-microbatch ``outputs`` of this rank -> the step's sums, in one all-reduce."""
    from megatron.core import parallel_state

    aux_name = moe_metrics.tracked_name(model)
    packed = len(SUM_NAMES) + len(REPLAY_SUM_NAMES)
    sums = torch.zeros(packed + (aux_name is not None), dtype=torch.float64, device=device)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    if outputs and tp_rank == 0:
        for out in outputs:
            sums[:packed] += torch.cat([out["sums"], out["replay_sums"]]).to(sums)
    if aux_name is not None:
        # Under sequence parallelism each TP rank holds the loss of its own tokens; without, copies.
        sums[-1] = moe_metrics.take_local_sum(aux_name, tp_rank == 0 or sequence_parallel).to(sums)
    torch.distributed.all_reduce(sums)
    sums = sums.cpu()
    aux = None if aux_name is None else moe_metrics.step_mean(sums[-1].item(), model, data_parallel_size, num_microbatches)
    return StepSums(gold=sums[: len(SUM_NAMES)], replay=sums[len(SUM_NAMES):packed], moe_aux_loss=aux)
