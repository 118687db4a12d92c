"""Evaluation during training (``eval.*``): the held-out target loss, the general data's loss and
the forgetting monitor KL(p_base || p_theta) on the general responses, full vocabulary,
vocab-parallel, through Megatron's forward-only schedule on the run's own layout (TP, PP, DP,
EP, FSDP).

The base costs no resident model. Before the run trains, the student holds the base's weights
(``student.checkpoint``; a resume loads them first): it runs once over the general sequences and
the last pipeline stage keeps, per microbatch, its final hidden states (host memory) and its
output-weight shard ``[V / tp, h]``. At every evaluation the base's logits are those hidden
states times that weight, chunk by chunk inside the loss, never a full ``[tokens, V]`` tensor.

An evaluation runs with dropout off and no gradient, reads no training sampler and draws no
random number: the training trajectory is that of the same run without it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass

import torch

from anchored_megatron.anchor import fused_output_anchored_loss, vocab_parallel_anchored_loss
from anchored_megatron.config import ConfigError, RunConfig
from anchored_megatron.data import build_sft_dataset, collate
from anchored_megatron.models.hidden_output import output_weight, return_hidden_states
from anchored_megatron.models.layout import unwrap

RECORD_KIND = "eval"  # the "record" field of an evaluation's line in metrics.jsonl
# Per set: the masked sums of the CE, of KL(p_base || p_theta) (general set only) and the tokens.
_SUMS = ("loss", "kl_base", "tokens")


@dataclass
class HeldOutSet:
    """One evaluation data set as this data-parallel rank sees it."""

    name: str  # "target" | "general"
    dataset: object
    # This rank's microbatches: sequence indices, None where a rank with fewer sequences pads
    # (every rank must run the same number of microbatches through the schedule).
    microbatches: list[list[int | None]]


def share(num_sequences: int, dp_rank: int, dp_size: int, micro_batch_size: int, microbatch_multiple: int = 1) -> list[list[int | None]]:
    """Sequences dp_rank, dp_rank + dp_size, ... in microbatches of ``micro_batch_size``, padded
    with None to the count of the rank with the most, rounded up to a multiple of ``microbatch_multiple``
    (the interleaved schedule runs groups of pipeline-size microbatches)."""
    mine = list(range(dp_rank, num_sequences, dp_size))
    microbatches = math.ceil(math.ceil(num_sequences / dp_size) / micro_batch_size)
    per_rank = math.ceil(microbatches / microbatch_multiple) * microbatch_multiple * micro_batch_size
    mine += [None] * (per_rank - len(mine))
    return [mine[i:i + micro_batch_size] for i in range(0, per_rank, micro_batch_size)]


def _record_digest(messages) -> bytes:
    return hashlib.blake2b(json.dumps(messages, sort_keys=True, ensure_ascii=False).encode(), digest_size=16).digest()


def find_overlap(eval_paths: dict[str, list[str]], train_paths: list[str]) -> str | None:
    """The first held-out record whose content is also a training record, as a message naming both
    places; None when the sets are disjoint. The held-out digests are kept, the training data streamed."""
    from anchored_megatron.data.records import BadRecord, iter_messages

    held_out = {}
    for option, paths in eval_paths.items():
        for i, path in enumerate(paths):
            for item in iter_messages(path):
                if not isinstance(item, BadRecord):
                    held_out.setdefault(_record_digest(item[1]), (f"{option}[{i}]", item[0]))
    if not held_out:
        return None
    for path in train_paths:
        for item in iter_messages(path):
            if isinstance(item, BadRecord):
                continue
            found = held_out.get(_record_digest(item[1]))
            if found is not None:
                option, location = found
                return (f"{option}: {location} is also a training record ({item[0]}); held-out data must not overlap "
                        "data.paths or data.replay_paths: remove the shared records from one side")
    return None


class Evaluator:
    """The run's evaluation: built at set-up (datasets, overlap check), ``capture_base`` once
    while the student holds the base's weights, then ``evaluate(step)`` as often as asked."""

    def __init__(self, cfg: RunConfig, runtime, tokenizer, wrapped: list, sharding, message):
        from megatron.core import parallel_state

        self.cfg, self.runtime, self.wrapped, self.sharding, self.message = cfg, runtime, wrapped, sharding, message
        self.fused = cfg.model.fused_output_loss
        self._check_overlap()
        mbs = cfg.train.micro_batch_size
        dp_rank, dp_size = parallel_state.get_data_parallel_rank(), runtime.data_parallel_size
        self.sets: list[HeldOutSet] = []
        for name, paths in (("target", cfg.eval.paths), ("general", cfg.eval.general_paths)):
            if not paths:
                continue
            data = dataclasses.replace(cfg.data, paths=list(paths), weights=None, replay_paths=[], replay_fraction=0.0)
            dataset = build_sft_dataset(data, tokenizer, cfg.model.seq_length, seed=cfg.seed, rank=runtime.rank,
                                        world_size=runtime.world_size, barrier=torch.distributed.barrier)
            count = len(dataset) if cfg.eval.max_sequences is None else min(len(dataset), cfg.eval.max_sequences)
            multiple = cfg.parallel.pp if len(wrapped) > 1 else 1
            self.sets.append(HeldOutSet(name, dataset, share(count, dp_rank, dp_size, mbs, multiple)))
        self.base_hidden: list[torch.Tensor] = []  # per general microbatch, on the host (last stage only)
        self.base_weight = None  # the base's output-weight shard [V / tp, h] (last stage only)

    def _check_overlap(self) -> None:
        """Decided on global rank 0 (one read of the training data), raised on every rank alike."""
        cfg = self.cfg
        verdict = [None]
        if self.runtime.rank == 0:
            verdict[0] = find_overlap({"eval.paths": cfg.eval.paths, "eval.general_paths": cfg.eval.general_paths},
                                      [*cfg.data.paths, *cfg.data.replay_paths])
        torch.distributed.broadcast_object_list(verdict, src=0)
        if verdict[0] is not None:
            raise ConfigError(verdict[0])

    # ---- the microbatches ------------------------------------------------------------------
    def _microbatches(self, held_out: HeldOutSet) -> list[dict]:
        batches = []
        for indices in held_out.microbatches:
            real = [i for i in indices if i is not None]
            items = [held_out.dataset[i] for i in real]
            # Padding repeats a sequence with nothing to score: it runs, and counts for nothing.
            filler = held_out.dataset[real[0] if real else 0]
            items += [dict(filler, loss_mask=torch.zeros_like(filler["loss_mask"]))] * (len(indices) - len(real))
            batches.append({k: v.to(self.runtime.device, non_blocking=True) for k, v in collate(items).items()})
        return batches

    def _forward_only(self, batches: list[dict], loss_func) -> list:
        """Megatron's schedule over ``batches`` without backward; the last stage's loss outputs."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        def forward_step(data_iterator, model):
            batch = next(data_iterator)
            output = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"))
            return output, lambda output_tensor: loss_func(batch, output_tensor)

        iterators = [iter(batches) for _ in self.wrapped]
        for chunk in self.wrapped:
            chunk.eval()
        try:
            with torch.no_grad():
                outputs = get_forward_backward_func()(
                    forward_step_func=forward_step,
                    data_iterator=iterators if len(iterators) > 1 else iterators[0],
                    model=self.wrapped if len(self.wrapped) > 1 else self.wrapped[0],
                    num_microbatches=len(batches),
                    seq_length=self.cfg.model.seq_length,
                    micro_batch_size=self.cfg.train.micro_batch_size,
                    forward_only=True,
                )
        finally:
            for chunk in self.wrapped:
                chunk.train()
            self.sharding.after_forward_only(self.wrapped)
        return outputs

    # ---- the base ----------------------------------------------------------------------------
    @property
    def _last_chunk(self):
        """The student's chunk holding the output layer on this stage, or None."""
        last = unwrap(self.wrapped[-1])
        return last if last.post_process else None

    def capture_base(self) -> None:
        """The base's final hidden states over the general sequences, and its output weight: call
        while the student holds the base's weights (before the first update)."""
        general = next((s for s in self.sets if s.name == "general"), None)
        if general is None:
            return
        started = time.perf_counter()
        last = self._last_chunk
        with self.sharding.whole_weights(self.wrapped[-1:]):
            self.base_weight = output_weight(last).detach().clone() if last is not None else None
        captured = []

        def keep(batch, hidden):
            captured.append(self._full_sequence(hidden).detach().to("cpu", copy=True))
            zero = hidden.new_zeros(())
            return zero, torch.ones((), dtype=torch.int, device=hidden.device), {}

        with _returning_hidden_states(last, already=self.fused):
            self._forward_only(self._microbatches(general), keep)
        self.base_hidden = captured
        held = sum(t.numel() * t.element_size() for t in captured)
        weight = 0 if self.base_weight is None else self.base_weight.numel() * self.base_weight.element_size()
        self.message(f"eval: the base's final hidden states over {len(general.microbatches)} general microbatches per rank kept in "
                     f"host memory ({held / 2**20:.1f} MiB on this rank) with its output-weight shard ({weight / 2**20:.1f} MiB), "
                     f"in {time.perf_counter() - started:.1f} s")

    def _full_sequence(self, hidden):
        """Under sequence parallelism without the fused loss, the logits path needs every token's
        hidden state: gathered over the tensor-parallel group once, at capture."""
        if self.fused or not self.cfg.parallel.sequence_parallel:
            return hidden
        from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

        return gather_from_sequence_parallel_region(hidden.transpose(0, 1).contiguous()).transpose(0, 1)

    # ---- an evaluation -----------------------------------------------------------------------
    def evaluate(self, step: int) -> dict:
        """One evaluation of every set: the record logged for ``step`` (the same on every rank)."""
        from megatron.core import parallel_state

        started = time.perf_counter()
        sums = torch.zeros(len(self.sets), len(_SUMS), dtype=torch.float64, device=self.runtime.device)
        last_tp_rank0 = self._last_chunk is not None and parallel_state.get_tensor_model_parallel_rank() == 0
        for index, held_out in enumerate(self.sets):
            base = iter(self.base_hidden) if held_out.name == "general" else None
            outputs = self._forward_only(self._microbatches(held_out), lambda batch, output: self._loss(batch, output, base))
            if last_tp_rank0:
                for out in outputs:
                    sums[index] += out["eval_sums"].to(sums)
        torch.distributed.all_reduce(sums)
        sums = sums.cpu()
        record = {"step": step, "record": RECORD_KIND}
        for index, held_out in enumerate(self.sets):
            loss, kl, tokens = sums[index].tolist()
            record[f"{held_out.name}_loss"] = loss / tokens if tokens else float("nan")
            if held_out.name == "general":
                record["general_kl_base"] = kl / tokens if tokens else float("nan")
            record[f"{held_out.name}_tokens"] = int(tokens)
        record["eval_time_s"] = time.perf_counter() - started
        return record

    def _loss(self, batch: dict, output, base_hidden):
        """(CE sum, tokens, sums) of one microbatch; with ``base_hidden`` (an iterator over the
        captured microbatches) also KL(p_base || p_theta) summed over the response tokens."""
        mask = batch["loss_mask"]
        vocab_size = self.cfg.model.vocab_size
        base = None if base_hidden is None else next(base_hidden).to(output.device, non_blocking=True)
        if self.fused:
            weight = output_weight(self._last_chunk)
            roles = {} if base is None else dict(reference_hidden=base, reference_weight=self.base_weight)
            result = fused_output_anchored_loss(
                output, weight, **roles, alpha=1.0, labels=batch["labels"], ce_weight=1.0, loss_mask=mask, vocab_size=vocab_size,
                sequence_parallel=bool(self.cfg.parallel.sequence_parallel), return_metrics=base is not None, check_labels=False,
                token_rows=batch.get("loss_rows"),
            )
            loss_sum, kl_sum = (result[0], result[1]["kl_reference"]) if base is not None else (result, None)
        else:
            reference = output.detach() if base is None else torch.matmul(base.to(self.base_weight.dtype), self.base_weight.t())
            result = vocab_parallel_anchored_loss(
                output, reference, alpha=1.0, labels=batch["labels"], ce_weight=1.0, vocab_size=vocab_size,
                return_metrics=base is not None, check_labels=False,
            )
            per_token, metrics = result if base is not None else (result, None)
            weights = mask.to(per_token.dtype)
            loss_sum = (per_token * weights).sum()
            kl_sum = None if metrics is None else (metrics["kl_reference"].to(weights.dtype) * weights).sum()
        tokens = mask.sum()
        kl_sum = loss_sum.new_zeros(()) if kl_sum is None else kl_sum
        sums = torch.stack([loss_sum.double(), kl_sum.double(), tokens.double()])
        return loss_sum, tokens.to(torch.int), {"eval_sums": sums}

    def line(self, record: dict) -> str:
        """The evaluation's line in train.log."""
        parts = [f"eval at step {record['step']}:"]
        for name in ("target_loss", "general_loss", "general_kl_base"):
            if name in record:
                parts.append(f"{name} {record[name]:.4f}")
        parts.append(f"({record['eval_time_s']:.1f} s)")
        return " ".join(parts)


class _returning_hidden_states:
    """Inside the block the last stage's chunk returns final hidden states instead of logits
    (``already``: it always does, under the fused output loss)."""

    def __init__(self, chunk, already: bool):
        self.chunk = None if already else chunk

    def __enter__(self):
        if self.chunk is not None:
            return_hidden_states(self.chunk)

    def __exit__(self, *exc):
        if self.chunk is not None:
            del self.chunk.output_layer.forward  # the pass-through was an attribute of this instance
        return False
