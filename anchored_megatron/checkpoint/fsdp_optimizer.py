"""The Megatron-FSDP student's Adam state in the checkpoint format a DDP run writes.

Megatron's distributed optimizer under Megatron-FSDP saves only its ``fsdp_dtensor`` format,
which is not a dist_checkpointing one and which a DDP run cannot read. The trainer's DDP runs
write ``fully_reshardable``: per parameter, the fp32 main weight and the two Adam moments as
whole tensors (per TP slice) keyed ``optimizer.state.<param|exp_avg|exp_avg_sq>.<model key>``,
and the param groups (with Adam's step count) as common state. ``FsdpOptimizerState`` writes
and reads exactly that from the FSDP shards, so a checkpoint moves between DDP and FSDP runs and
between data-parallel sizes; it stands in for the optimizer in ``trainer_io.save_checkpoint`` /
``load_checkpoint``. Each whole tensor is assembled (save) or cut (load) from this rank's slice
of the parameter, one parameter at a time; the model weights must be gathered meanwhile
(the trainer's ``sharding.gathered_weights``), as the keys come from the model's sharded state dict.
"""

from __future__ import annotations

import dataclasses

import torch

STATE_KEYS = ("param", "exp_avg", "exp_avg_sq")
FORMAT = "fully_reshardable"
# What tells Megatron's parameter groups apart (which parameters a group holds is not saved).
GROUP_IDENTITY = ("wd_mult", "lr_mult", "is_expert_parallel", "is_decoupled_lr")


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


class FsdpOptimizerState:
    """What ``trainer_io`` asks of an optimizer, for the Megatron-FSDP student ``wrapped``.
    A load ends with ``finish_load()``, called once the gathered weights are released."""

    def __init__(self, optimizer, wrapped: list):
        from anchored_megatron.models.layout import megatron_fsdp

        if len(wrapped) != 1:
            raise ValueError("FsdpOptimizerState: Megatron-FSDP runs hold one model chunk")
        self.fsdp = megatron_fsdp(wrapped[0])
        inner = getattr(optimizer, "chained_optimizers", None) or [optimizer]
        if len(inner) != 1:
            raise ValueError(f"FsdpOptimizerState: expected one Megatron optimizer, got {len(inner)}")
        self.torch_optimizer = inner[0].optimizer
        self._loaded_main_weights = []

    # ---- the parameters: (raw full-size param, optimizer's shard param, slice of the flat param) ----
    def _parameters(self):
        buffer = self.fsdp.param_and_grad_buffer
        for name, shard in buffer.optimizer_named_parameters:
            yield self.fsdp.raw_param[name], shard, shard.megatron_fsdp_slice

    def _group(self):
        from megatron.core import parallel_state

        return parallel_state.get_data_parallel_group(with_context_parallel=True)

    def _whole(self, raw: torch.Tensor, local: torch.Tensor | None, where: slice) -> torch.Tensor:
        """The whole (TP-slice) fp32 tensor from each DP rank's ``local`` slice of it."""
        flat = torch.zeros(raw.numel(), dtype=torch.float32, device=raw.device)
        if local is not None and local.numel():
            flat[where] = local.reshape(-1).float()
        torch.distributed.all_reduce(flat, group=self._group())
        return flat.view(raw.shape)

    # ---- save / load, as trainer_io calls them ------------------------------------------------
    def sharded_state_dict(self, model_sharded_state_dict: dict, is_loading: bool = False, metadata: dict | None = None) -> dict:
        from megatron.core.dist_checkpointing.dict_utils import nested_values
        from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory
        from megatron.core.dist_checkpointing.utils import extract_sharded_tensors_and_factories

        if (metadata or {}).get("distrib_optim_sharding_type") != FORMAT:
            raise ValueError(f"FsdpOptimizerState writes the {FORMAT} format only, got metadata {metadata}")
        model_tensors, _ = extract_sharded_tensors_and_factories(model_sharded_state_dict)
        by_param = {id(sh.data): sh for sh in nested_values(model_tensors)}
        param_state = {}
        for index, (raw, shard, where) in enumerate(self._parameters()):
            described = by_param[id(raw)]
            state = self.torch_optimizer.state.get(shard, {})
            tensors = {}
            for key in STATE_KEYS:
                if is_loading:
                    data = torch.empty(raw.shape, dtype=torch.float32, device=raw.device)
                else:
                    local = _local(shard) if key == "param" else (_local(state[key]) if key in state else None)
                    data = self._whole(raw, local, where)
                fields = dict(key=f"optimizer.state.{key}.{described.key}", data=data, replica_id=described.replica_id)
                if not isinstance(described, ShardedTensorFactory):
                    fields["dtype"] = data.dtype
                tensors[key] = dataclasses.replace(described, **fields)
            param_state[index] = tensors
        return {"optimizer": self._param_groups(), "param_state": param_state, "param_state_sharding_type": FORMAT}

    def _param_groups(self) -> dict:
        """The param groups without their params, each with Adam's step count: what DDP keeps."""
        steps = {float(s["step"]) for s in self.torch_optimizer.state.values() if "step" in s}
        step = steps.pop() if len(steps) == 1 else 0.0
        groups = []
        for group in self.torch_optimizer.state_dict()["param_groups"]:
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "step": step})
        return {"param_groups": groups}

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict) -> None:
        groups = state_dict["optimizer"]["param_groups"]
        mine = self.torch_optimizer.param_groups
        if len(groups) != len(mine):
            raise ValueError(f"the checkpoint's optimizer has {len(groups)} parameter groups, this one {len(mine)}")
        for saved, group in zip(groups, mine):
            # The groups pair up by position: they must be the same groups (e.g. with and without weight decay).
            differs = [k for k in GROUP_IDENTITY if k in saved and saved[k] != group.get(k)]
            if differs:
                raise ValueError(f"the checkpoint's optimizer parameter groups differ from this one's in {differs}")
            group.update({k: v for k, v in saved.items() if k not in ("params", "step")})
        step = float(groups[0].get("step", 0.0))
        self._loaded_main_weights = []
        for index, (raw, shard, where) in enumerate(self._parameters()):
            loaded = state_dict["param_state"][index]
            if not _local(shard).numel():
                continue
            state = self.torch_optimizer.state[shard]
            for key in STATE_KEYS:
                local = loaded[key].reshape(-1)[where].view(_local(shard).shape)
                if key == "param":
                    self._loaded_main_weights.append((shard, local.clone()))
                else:
                    state[key] = _shard_like(shard, local.to(_local(shard).dtype))
            state["step"] = torch.tensor(step, dtype=torch.float32)

    @torch.no_grad()
    def finish_load(self) -> None:
        """After the gathered weights went back into the shards: the fp32 main weights as saved
        (the gathered weights carry only the model's precision), and the weights the forward
        reads refreshed from them."""
        for shard, local in self._loaded_main_weights:
            _local(shard).copy_(local)
        self._loaded_main_weights = []
        self.fsdp.param_and_grad_buffer.copy_main_weights_to_model_weights()


def _shard_like(param: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """An optimizer-state tensor laid out like ``param`` (a DTensor with Megatron-FSDP's uneven
    local shape, built from the local part rather than split evenly)."""
    if not hasattr(param, "to_local"):
        return local.clone()
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        local.clone(), device_mesh=param.device_mesh, placements=param.placements, run_check=False,
        shape=param.shape, stride=param.stride(),
    )
