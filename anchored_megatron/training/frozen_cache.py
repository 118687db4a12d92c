"""The frozen roles' final hidden states, kept per sequence so that later epochs skip their forwards
(``train.frozen_hidden_cache``).

Why: over T outer iterations x K epochs the reference meets each sequence T x K times and the
snapshot K times per iteration, with unchanged weights every time, and each such forward costs
about a third of a training step. With the fused output loss a frozen role's whole part in the
loss is its final hidden states (the loss applies the output weight itself), so keeping those is
exact.

Where: host memory, one tensor per (role, sequence) on the last pipeline stage; the other stages
only remember which sequences are held, to skip the same forwards. Whether a role's forward is
skipped for a microbatch is decided once per step for all ranks together (``plan_step``: one
all-reduce of a few integers): only when every rank holds it, so the collectives inside the frozen
forwards (tensor, expert parallel) stay matched across ranks that hold different sequences.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from anchored_megatron.config import ConfigError, RunConfig

PLAN_KEY = "frozen_plan"  # in a microbatch dict: its FrozenPlan


@dataclass(frozen=True)
class FrozenPlan:
    """One microbatch: its sequences' keys and, per frozen role, whether its output comes from the cache."""

    keys: tuple
    cached: tuple[bool, ...]


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.device.type == "cpu":
        return tensor.clone()  # the caller's tensor may be reused; the cache owns its copy
    # Asynchronous: the copy is complete before anyone reads it, since every step ends in a host
    # sync on the same stream (the metrics' all-reduce result is read on the host) and a stored
    # sequence is read at the earliest in the next step.
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return host.copy_(tensor, non_blocking=True)


class FrozenHiddenCache:
    """Per frozen role: sequence key -> that sequence's final hidden states [s, h] (last stage), or
    just the set of keys (other stages)."""

    def __init__(self, num_roles: int, stores_tensors: bool):
        self.stores_tensors = stores_tensors
        self.held: list[dict] = [{} for _ in range(num_roles)]

    def holds(self, role: int, keys) -> bool:
        return all(key in self.held[role] for key in keys)

    def clear(self, role: int) -> None:
        self.held[role].clear()

    def nbytes_of(self, role: int) -> int:
        return sum(t.numel() * t.element_size() for t in self.held[role].values() if t is not None)

    def plan_step(self, keys_per_microbatch: list[tuple], device) -> list[FrozenPlan]:
        """Each microbatch's plan, the same on every rank: a role is read from the cache only where
        all ranks hold that microbatch's sequences (one all-reduce of [microbatches x roles])."""
        local = [[self.holds(role, keys) for role in range(len(self.held))] for keys in keys_per_microbatch]
        flags = torch.tensor(local, dtype=torch.int32, device=device).reshape(len(keys_per_microbatch), len(self.held))
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MIN)
        return [FrozenPlan(keys, tuple(bool(f) for f in row)) for keys, row in zip(keys_per_microbatch, flags.tolist())]

    def exchange(self, plan: FrozenPlan, frozen_outputs: list, student_output: torch.Tensor) -> list[torch.Tensor]:
        """``frozen_outputs`` with the cached roles filled in (None where the role did not run);
        the roles that ran are stored. On a stage before the last a cached role's slot is zeros of
        the student's shape: the P2P tensor keeps its width and the next stage skips that role too."""
        filled = []
        for role, output in enumerate(frozen_outputs):
            if plan.cached[role]:
                filled.append(self._read(role, plan.keys, student_output))
                continue
            self._store(role, plan.keys, output)
            filled.append(output)
        return filled

    def _store(self, role: int, keys, output: torch.Tensor) -> None:
        held = self.held[role]
        if not self.stores_tensors:
            held.update(dict.fromkeys(keys))
            return
        # Last stage: [b, s, h] (b = the microbatch's sequences in key order). A copy per row: a
        # row kept as a view would keep its whole microbatch alive after the others are replaced.
        for row, key in enumerate(keys):
            held[key] = _to_host(output[row])

    def _read(self, role: int, keys, student_output: torch.Tensor) -> torch.Tensor:
        if not self.stores_tensors:
            return torch.zeros_like(student_output)
        held = self.held[role]
        return torch.stack([held[key] for key in keys]).to(student_output.device, non_blocking=True)


def estimated_bytes(sequences: int, seq_length: int, hidden_size: int, num_roles: int, tp: int, sequence_parallel: bool) -> int:
    """Host bytes the cache reaches on a last-stage rank holding ``sequences`` sequences: fp32 hidden
    states (Megatron's Float16Module hands the last stage's output over in fp32), split over the TP
    ranks only under sequence parallelism."""
    tokens = seq_length // tp if sequence_parallel else seq_length
    return sequences * tokens * hidden_size * 4 * num_roles


def check_host_memory(sequences: int, held_bytes: int, last_stage_ranks_per_host: int, available_bytes: int | None) -> str:
    """The line the run logs about the cache; raises ConfigError when the last-stage ranks of this
    host would hold more than 80% of its available memory."""
    gib = 1024**3
    per_host = held_bytes * last_stage_ranks_per_host
    if available_bytes is not None and per_host > 0.8 * available_bytes:
        raise ConfigError(
            f"train.frozen_hidden_cache: the frozen roles' hidden states of {sequences} sequences per rank need {held_bytes / gib:.1f} GiB "
            f"per last-stage rank, {per_host / gib:.1f} GiB on this host ({last_stage_ranks_per_host} such ranks), which has "
            f"{available_bytes / gib:.1f} GiB available; set it to false, or spread the data over more data-parallel ranks")
    return f"up to {held_bytes / gib:.2f} GiB per last-stage rank ({sequences} sequences)"


def available_host_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def last_stage_ranks_per_host(pipeline_parallel_size: int) -> int:
    """Ranks of this host that hold a cache, assuming torchrun's LOCAL_WORLD_SIZE ranks spread evenly over the stages."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")) // pipeline_parallel_size)


def for_run(cfg: RunConfig, role_names: list[str], dataset_lengths: list[int], data_parallel_size: int) -> tuple[FrozenHiddenCache, str]:
    """The run's cache for the frozen roles ``role_names``, after checking that what it will hold
    (each dataset's share of this rank) fits in this host's memory; and the line the run logs about it."""
    from megatron.core import parallel_state

    sequences = sum(-(-length // data_parallel_size) for length in dataset_lengths)
    held = estimated_bytes(sequences, cfg.model.seq_length, cfg.model.hidden_size, len(role_names), cfg.parallel.tp, cfg.parallel.sequence_parallel)
    size = check_host_memory(sequences, held, last_stage_ranks_per_host(cfg.parallel.pp), available_host_bytes())
    note = f"train.frozen_hidden_cache: keeping {', '.join(role_names)}'s final hidden states in host memory, {size}"
    return FrozenHiddenCache(len(role_names), stores_tensors=parallel_state.is_pipeline_last_stage()), note
