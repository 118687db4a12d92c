"""Memory per rank of an anchored run, pipeline stage by pipeline stage.

Per rank (every TP and DP rank of a stage holds the same):
- student weights: parameters x param bytes;
- grads: Megatron DDP with ``grad_reduce_in_fp32`` keeps an fp32 main-grad buffer of every
  trainable parameter (4 B/param, not sharded, also with the distributed optimizer);
- optimizer state (Adam): fp32 master weights + two fp32 moments = 12 B/param for bf16/fp16
  parameters; fp32 parameters are their own master copy, 8 B/param. The distributed
  optimizer shards this over the data-parallel ranks, a MoE model's experts over the
  expert-data-parallel ones (DP / EP: the other EP ranks hold other experts);
- frozen roles (reference, snapshot): weights only, same layout as the student, no grads,
  no optimizer state (a reference with an MLP of its own, e.g. a dense teacher of a MoE
  student, is counted at the student's size);
- activations: ``activations.py`` (per layer per microbatch x layers on the rank x
  in-flight microbatches, P2P buffers, the loss peak on the last stage, one layer transient,
  and for MoE models one layer's all-to-all token buffers).

With ``parallel.fsdp`` (Megatron-FSDP, PP = 1) every rank holds 1/DP of the student's weights,
grads and optimizer state and of each frozen role's weights, plus what is gathered at the
peak (``gathered``): the student's non-layer weights (embedding, output layer, final norm:
gathered at its forward, released after its backward), two layers of weights (the one running
and the one prefetched) and one layer's fp32 grads before their reduce-scatter.

Not counted: CUDA context and allocator fragmentation (budget 2-5 GiB per GPU), the DDP
buckets' padding, communication buffers (NCCL), checkpoint-save staging copies.
"""

from __future__ import annotations

from dataclasses import dataclass

from anchored_megatron.config import RunConfig
from anchored_megatron.planning import activations as act
from anchored_megatron.planning.parameters import layer_parameters, rank_parameters, total_parameters

GIB = 1024**3


@dataclass(frozen=True)
class StageMemory:
    """Bytes on one rank of pipeline stage ``pp_rank``."""

    pp_rank: int
    layers: int
    parameters: int  # student parameters on this rank
    weights: int
    grads: int
    optimizer: int
    frozen_weights: int
    activations: int
    gathered: int = 0  # Megatron-FSDP: weights (and a layer's grads) gathered whole at the peak

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.frozen_weights + self.activations + self.gathered


@dataclass(frozen=True)
class MemoryPlan:
    world_size: int
    data_parallel_size: int
    num_microbatches: int
    frozen_roles: tuple[str, ...]
    stages: tuple[StageMemory, ...]

    @property
    def peak(self) -> StageMemory:
        return max(self.stages, key=lambda stage: stage.total)


def optimizer_bytes_per_param(params_dtype: str) -> int:
    return 8 if params_dtype == "fp32" else 12


def plan_memory(cfg: RunConfig, world_size: int) -> MemoryPlan:
    """The memory plan of ``cfg`` on ``world_size`` ranks (validate ``cfg`` first)."""
    model, parallel = cfg.model, cfg.parallel
    dp = parallel.data_parallel_size(world_size)
    num_microbatches = cfg.train.num_microbatches(dp)
    frozen = cfg.anchor.frozen_roles
    num_roles = 1 + len(frozen)
    beta = act.PARAM_BYTES[model.params_dtype]
    mbs = cfg.train.micro_batch_size
    per_layer = act.layer_activation_bytes(model, parallel, mbs)
    stages = []
    for pp_rank in range(parallel.pp):
        chunks = rank_parameters(model, parallel, pp_rank)
        params = sum(chunk.total for chunk in chunks)
        layers = sum(chunk.layers for chunk in chunks)
        first, last = pp_rank == 0, pp_rank == parallel.pp - 1
        experts = sum(chunk.experts for chunk in chunks)
        per_param = optimizer_bytes_per_param(model.params_dtype)
        optimizer = params * per_param
        if cfg.optim.distributed_optimizer or parallel.fsdp:
            optimizer = _ceil_div((params - experts) * per_param, dp) + _ceil_div(experts * per_param, dp // parallel.ep)
        held = act.in_flight_microbatches(parallel, pp_rank, num_microbatches)
        activations = held * (layers * per_layer + act.pipeline_buffer_bytes(model, parallel, mbs, num_roles, first, last))
        activations += per_layer  # one layer's working set (frozen roles' no-grad forward, backward temporaries)
        activations += act.all_to_all_bytes(model, mbs)
        if last:
            activations += act.loss_activation_bytes(model, parallel, mbs, num_roles)
        shard = (lambda nbytes: -(-nbytes // dp)) if parallel.fsdp else (lambda nbytes: nbytes)
        stages.append(
            StageMemory(
                pp_rank=pp_rank,
                layers=layers,
                parameters=params,
                weights=shard(params * beta),
                grads=shard(params * 4),
                optimizer=optimizer,
                frozen_weights=shard(params * beta) * len(frozen),
                activations=int(activations),
                gathered=fsdp_gathered_bytes(model, parallel, chunks) if parallel.fsdp else 0,
            )
        )
    return MemoryPlan(world_size=world_size, data_parallel_size=dp, num_microbatches=num_microbatches, frozen_roles=frozen, stages=tuple(stages))


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def fsdp_gathered_bytes(model, parallel, chunks) -> int:
    """What Megatron-FSDP holds whole at the peak on one rank (see the module docstring)."""
    beta = act.PARAM_BYTES[model.params_dtype]
    layer = layer_parameters(model, parallel.tp)
    outside_layers = sum(chunk.embedding + chunk.output_layer + chunk.final_norm for chunk in chunks)
    return outside_layers * beta + 2 * layer * beta + layer * 4


def checkpoint_bytes(cfg: RunConfig) -> int:
    """Bytes one trainer checkpoint of ``cfg`` takes on disk, all ranks together: the student's
    weights plus the optimizer's fp32 state (the snapshot, when kept, adds weights once more)."""
    model = cfg.model
    params = total_parameters(model)
    weights = params * act.PARAM_BYTES[model.params_dtype]
    snapshot = weights if cfg.anchor.needs_snapshot else 0
    return weights + params * optimizer_bytes_per_param(model.params_dtype) + snapshot
