"""Where each parameter lives across TP ranks and pipeline stages.

Names are "canonical" when they use the global layer index (``decoder.layers.7``)
rather than the index inside this rank's pipeline chunk, and tensors are "full"
when they hold the whole TP=1 tensor. Converters go through these helpers instead of
re-deriving Megatron's layout.
"""

from __future__ import annotations

import re

import torch

_LAYER = re.compile(r"^(?P<prefix>(?:module\.)*decoder\.layers\.)(?P<index>\d+)\.")


def canonical_name(chunk, local_name: str) -> str:
    """``decoder.layers.1.x`` on a later pipeline stage -> ``decoder.layers.<global>.x``."""
    match = _LAYER.match(local_name)
    if not match:
        return local_name.replace("module.", "")
    layers = unwrap(chunk).decoder.layers
    global_index = layers[int(match.group("index"))].layer_number - 1
    return f"decoder.layers.{global_index}." + local_name[match.end():]


def unwrap(module):
    """The GPTModel inside DDP / Float16Module / RoleStack wrappers."""
    while hasattr(module, "module"):
        module = module.module
    return module


def megatron_fsdp(wrapped):
    """The ``MegatronFSDP`` inside a student wrapper or a ``ShardedFrozenRole``."""
    from megatron.core.distributed.fsdp.src.megatron_fsdp.megatron_fsdp import MegatronFSDP

    module = wrapped
    while not isinstance(module, MegatronFSDP):
        module = module.module
    return module


def _is_gated_fc1(name: str) -> bool:
    return name.endswith("mlp.linear_fc1.weight") or name.endswith("mlp.linear_fc1.bias")


def partition_dim(param: torch.Tensor) -> int | None:
    """The dimension split across TP ranks, or None when the tensor is replicated."""
    if getattr(param, "tensor_model_parallel", False):
        return param.partition_dim
    return None


def shard(full: torch.Tensor, name: str, param: torch.Tensor, tp_rank: int, tp_size: int, gated: bool = True) -> torch.Tensor:
    """This TP rank's slice of ``full`` for the parameter ``param`` named ``name``."""
    dim = partition_dim(param)
    if dim is None or tp_size == 1:
        return full
    if gated and _is_gated_fc1(name):
        # fc1 = cat(gate, up); each rank holds cat(gate_r, up_r), not a contiguous slice.
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp_size, dim=0)[tp_rank], up.chunk(tp_size, dim=0)[tp_rank]], dim=0)
    return full.chunk(tp_size, dim=dim)[tp_rank]


def unshard(shards: list[torch.Tensor], name: str, param: torch.Tensor, gated: bool = True) -> torch.Tensor:
    """Inverse of ``shard``: the full tensor from every TP rank's slice, in rank order."""
    dim = partition_dim(param)
    if dim is None or len(shards) == 1:
        return shards[0]
    if gated and _is_gated_fc1(name):
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(shards, dim=dim)
