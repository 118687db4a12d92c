"""Plan a run before launching it: the preflight that completes the config and checks it and its
files without process groups (``preflight.prepare_run``, also the trainer's), the parameters each
rank holds and its memory (``anchored-sft --dry-run``)."""

from anchored_megatron.planning.memory import MemoryPlan, StageMemory, plan_memory
from anchored_megatron.planning.parameters import ChunkParameters, chunk_parameters, layer_parameters, rank_parameters, total_parameters
from anchored_megatron.planning.preflight import prepare_run
from anchored_megatron.planning.report import dry_run, format_plan

__all__ = [
    "ChunkParameters", "MemoryPlan", "StageMemory", "chunk_parameters", "dry_run", "format_plan", "layer_parameters",
    "plan_memory", "prepare_run", "rank_parameters", "total_parameters",
]
