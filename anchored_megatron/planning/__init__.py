"""Plan a run before launching it: validate the config without process groups, count the
parameters each rank holds and estimate its memory (``anchored-sft --dry-run``)."""

from anchored_megatron.planning.memory import MemoryPlan, StageMemory, plan_memory
from anchored_megatron.planning.parameters import ChunkParameters, chunk_parameters, layer_parameters, rank_parameters, total_parameters
from anchored_megatron.planning.report import dry_run, format_plan

__all__ = [
    "ChunkParameters", "MemoryPlan", "StageMemory", "chunk_parameters", "dry_run", "format_plan", "layer_parameters",
    "plan_memory", "rank_parameters", "total_parameters",
]
