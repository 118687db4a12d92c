"""``anchored-sft --dry-run``: prepare a run config as the trainer does (``preflight.prepare_run``),
without any process group, and print its parallel layout, parameters per rank and memory per rank."""

from __future__ import annotations

import os

from anchored_megatron.config import ConfigError, RunConfig
from anchored_megatron.planning.memory import GIB, MemoryPlan, plan_memory
from anchored_megatron.planning.activations import all_to_all_bytes
from anchored_megatron.planning.parameters import layer_expert_parameters, total_parameters
from anchored_megatron.planning.preflight import prepare_run


def resolve_world_size(cfg: RunConfig, world_size: int | None) -> tuple[int, str]:
    """(world size, where it came from): the argument, else $WORLD_SIZE (torchrun / an
    exported value), else the smallest layout tp x pp (data-parallel size 1)."""
    if world_size is not None:
        source = "--world-size"
    elif os.environ.get("WORLD_SIZE"):
        raw = os.environ["WORLD_SIZE"]
        try:
            world_size = int(raw)
        except ValueError:
            raise ConfigError(f"WORLD_SIZE: must be an integer, got {raw!r}") from None
        source = "$WORLD_SIZE"
    else:
        world_size = cfg.parallel.tp * cfg.parallel.pp
        source = "tp x pp; set WORLD_SIZE to plan a data-parallel layout"
    if not isinstance(world_size, int) or world_size < 1:
        raise ConfigError(f"world size: must be an integer >= 1, got {world_size!r}")
    return world_size, source


def dry_run(cfg: RunConfig, world_size: int | None = None, check_files: bool = True) -> str:
    """Complete and check ``cfg`` exactly as the trainer does (without creating process groups) and
    return the plan as text. ``check_files=False`` plans before the data and checkpoints are staged:
    missing files are then not errors, but a student checkpoint that exists still sets the model."""
    world_size, source = resolve_world_size(cfg, world_size)
    prepare_run(cfg, world_size, check_files=check_files)
    return format_plan(cfg, plan_memory(cfg, world_size), source)


def _gib(nbytes: float) -> str:
    return f"{nbytes / GIB:.2f}"


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _moe_lines(cfg: RunConfig, plan: MemoryPlan) -> list[str]:
    model, parallel = cfg.model, cfg.parallel
    if not model.is_moe:
        return []
    per_rank = layer_expert_parameters(model, parallel.tp, parallel.ep)
    shared = f", shared expert {model.moe_shared_expert_intermediate_size}" if model.moe_shared_expert_intermediate_size else ""
    return [
        f"experts: {model.num_moe_experts} per layer (top {model.moe_router_topk}, ffn {model.expert_ffn_hidden_size}{shared})"
        f", EP {parallel.ep}: {model.num_moe_experts // parallel.ep} per rank, {_count(per_rank)} expert parameters per layer per rank"
        + (f", optimizer state sharded over {plan.data_parallel_size // parallel.ep} expert-data-parallel ranks"
           if cfg.optim.distributed_optimizer else "")
        + f"; all-to-all buffers {_gib(all_to_all_bytes(model, cfg.train.micro_batch_size))} GiB per layer"
        f"; {model.moe_token_dispatcher_type} dispatcher, load balancing {model.moe_router_load_balancing_type}"
        f" x {model.moe_aux_loss_coeff:g} (student only)",
    ]


def format_plan(cfg: RunConfig, plan: MemoryPlan, world_source: str) -> str:
    model, parallel, train = cfg.model, cfg.parallel, cfg.train
    roles = " + ".join(("student",) + plan.frozen_roles)
    optimizer = "distributed (sharded over DP)" if cfg.optim.distributed_optimizer or parallel.fsdp else "replicated"
    sharding = ("Megatron-FSDP: every role's weights, the student's grads and optimizer state sharded over DP, one layer gathered at a time"
                if parallel.fsdp else "frozen roles co-sharded with the student, weights only")
    lines = [
        "config: valid",
        f"world size {plan.world_size} ({world_source}) = TP {parallel.tp} x PP {parallel.pp} x DP {plan.data_parallel_size}"
        f"{f' (EP {parallel.ep} within DP)' if parallel.ep > 1 else ''}"
        f"; virtual stages {parallel.vpp or 1}; sequence parallel {'on' if parallel.sequence_parallel else 'off'}",
        f"model: {model.num_layers} layers, hidden {model.hidden_size}, ffn {model.ffn_hidden_size}, heads {model.num_attention_heads}"
        f" (query groups {model.num_query_groups}), vocab {model.vocab_size} padded to {model.padded_vocab_size(parallel.tp)}"
        f", {'tied' if model.tie_embeddings else 'untied'} embeddings, {model.params_dtype}, {model.transformer_impl} spec"
        f"; {_count(total_parameters(model))} parameters",
        *_moe_lines(cfg, plan),
        f"objective {cfg.anchor.objective}: roles {roles} ({sharding})",
        f"batch: micro {train.micro_batch_size} x {plan.num_microbatches} microbatches x DP {plan.data_parallel_size}"
        f" = global {train.global_batch_size} sequences of {model.seq_length} tokens; optimizer {optimizer}",
        "",
        "memory per rank in GiB (every TP/DP rank of a stage alike):",
        f"{'stage':>5} {'layers':>6} {'params':>9} {'weights':>8} {'grads':>8} {'optim':>8} {'frozen':>8} {'activ':>8}"
        + (f" {'gathered':>8}" if parallel.fsdp else "") + f" {'total':>8}",
    ]
    for stage in plan.stages:
        lines.append(
            f"{stage.pp_rank:>5} {stage.layers:>6} {_count(stage.parameters):>9} {_gib(stage.weights):>8} {_gib(stage.grads):>8}"
            f" {_gib(stage.optimizer):>8} {_gib(stage.frozen_weights):>8} {_gib(stage.activations):>8}"
            + (f" {_gib(stage.gathered):>8}" if parallel.fsdp else "") + f" {_gib(stage.total):>8}"
        )
    peak = plan.peak
    lines += [
        "",
        f"peak: stage {peak.pp_rank}, {_gib(peak.total)} GiB per GPU"
        " (plus CUDA context and allocator fragmentation, typically 2-5 GiB; see docs/scale-out.md)",
    ]
    return "\n".join(lines)
