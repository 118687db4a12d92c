"""How the roles' weights are held across the data-parallel group: whole on every rank (Megatron
DDP, ``Ddp``) or sharded (Megatron-FSDP, ``parallel.fsdp``, ``Fsdp``). The trainer picks one with
``choose`` and calls it wherever the two differ; the rest of this module is Megatron-FSDP's side.

- The student is wrapped with the ``optim_grads_params`` strategy: weights, gradients and Adam
  state are each held 1/DP per rank; one ``TransformerLayer`` (an FSDP unit) at a time is
  gathered for its forward and again for its backward.
- A frozen role (reference, snapshot) is wrapped the same way with every parameter frozen, so
  Megatron-FSDP gives it a weight shard only (no gradient, no fp32 main weights). Its no-grad
  forward gathers unit by unit; ``ShardedFrozenRole`` then releases what the forward left
  gathered (the embedding, output layer and final norm, which are not units and are otherwise
  released only after a backward the frozen roles never run).

Between forwards a role's parameters are DTensors over this rank's shard of the flat weight
buffer. Student and snapshot are built from the same model config, so their buffers are laid
out alike: a snapshot refresh copies this rank's shard into the snapshot's (``copy_shards``).
Reading or writing whole tensors (checkpoints, converted weights) goes through
``gathered_weights``, which gathers one model chunk for the duration.
"""

from __future__ import annotations

import contextlib

import torch

from anchored_megatron.checkpoint.fsdp_optimizer import FsdpOptimizerState
from anchored_megatron.config import RunConfig
from anchored_megatron.models.layout import megatron_fsdp
from anchored_megatron.training.optim import wrap_ddp
from anchored_megatron.training.roles import copy_weights, freeze

STRATEGY = "optim_grads_params"


def _fsdp_config(chunk):
    from megatron.core.distributed import DistributedDataParallelConfig

    from anchored_megatron.platform.mcore_compat import fsdp

    return DistributedDataParallelConfig(
        use_megatron_fsdp=True,
        data_parallel_sharding_strategy=STRATEGY,
        use_distributed_optimizer=True,
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        overlap_param_gather=False,
        check_for_nan_in_grad=False,
        **fsdp.ddp_config_overrides(chunk, backend=torch.distributed.get_backend()),
    )


def _wrap(chunk):
    from megatron.core.distributed.fsdp.mcore_fsdp_adapter import FullyShardedDataParallel

    return FullyShardedDataParallel(config=chunk.config, ddp_config=_fsdp_config(chunk), module=chunk)


def wrap_fsdp(chunks) -> list:
    """The trainable chunks (one: FSDP runs without pipeline stages) in Megatron-FSDP."""
    return [_wrap(chunk) for chunk in chunks]


class ShardedFrozenRole(torch.nn.Module):
    """A frozen role in Megatron-FSDP: forward gathers unit by unit, then releases everything."""

    def __init__(self, chunk):
        super().__init__()
        if any(p.requires_grad for p in chunk.parameters()):
            raise ValueError("ShardedFrozenRole: freeze the chunk before sharding it")
        self.module = _wrap(chunk)

    def forward(self, *args, **kwargs):
        try:
            return self.module(*args, **kwargs)
        finally:
            release_gathered(self.module)


def shard_frozen(chunks) -> list:
    return [ShardedFrozenRole(chunk) for chunk in chunks]


def release_gathered(wrapped) -> None:
    """Free every gathered weight bucket and put the sharded parameters back in the module."""
    from anchored_megatron.platform.mcore_compat import fsdp

    fsdp.release_gathered(megatron_fsdp(wrapped))


def _weight_buffers(wrapped):
    """(names, buffer) per parameter group: the low-precision weights every forward gathers."""
    fsdp = megatron_fsdp(wrapped)
    buffer = fsdp.param_and_grad_buffer
    for group in buffer.parameter_groups:
        yield [buffer.param_to_name[p] for p in group.params], group


@torch.no_grad()
def copy_shards(source_chunks, target_chunks) -> None:
    """target <- source, this rank's shard of every weight buffer (no gather). Both sides must
    be Megatron-FSDP models of the same config (the buffers are laid out alike)."""
    for source, target in zip(source_chunks, target_chunks, strict=True):
        pairs = list(zip(_weight_buffers(source), _weight_buffers(target), strict=True))
        for (source_names, source_group), (target_names, target_group) in pairs:
            mine, theirs = source_group.model_weight_buffer, target_group.model_weight_buffer
            if source_names != target_names or mine.data.shape != theirs.data.shape:
                raise RuntimeError(f"copy_shards: the two models' FSDP buffers differ ({source_names[:2]} ... vs {target_names[:2]} ...)")
            theirs.data.copy_(mine.data)
            if target_group.main_weight_buffer is not None:
                target_group.main_weight_buffer.data.copy_(mine.data)


@contextlib.contextmanager
def gathered_weights(chunks, write: bool = False):
    """Every parameter of ``chunks`` gathered whole (as DDP holds it) inside the block, so the
    model's own ``sharded_state_dict`` / ``load_state_dict`` work unchanged. With ``write``, what
    the block wrote into the weights is stored back into each rank's shards (the low-precision
    weights and, for the student, the fp32 main weights the optimizer updates)."""
    fsdps = [megatron_fsdp(chunk) for chunk in chunks]
    for fsdp in fsdps:
        # The forward's own first step: the module's parameters become the full-size tensors.
        fsdp._replace_param_with_raw_if_needed()
        fsdp.all_gather_and_wait_parameters_ready(params=list(fsdp.module.parameters()), prefetch=False)
    try:
        with _without_state_dict_hooks(fsdps):
            yield
        if write:
            with torch.no_grad():
                for fsdp in fsdps:
                    for group in fsdp.param_and_grad_buffer.parameter_groups:
                        for item_id, param in enumerate(group.params):
                            for buffer in (group.model_weight_buffer, group.main_weight_buffer):
                                if buffer is not None:
                                    buffer.set_item(item_id, param.detach())
    finally:
        for chunk in chunks:
            release_gathered(chunk)


@contextlib.contextmanager
def _without_state_dict_hooks(fsdps):
    """Megatron-FSDP hooks every module's ``state_dict`` to swap the shards (DTensors) back in,
    and ``load_state_dict`` to overwrite the weights with the optimizer's main weights; both
    would defeat the gathered view, so they are set aside for the block."""
    modules = [m for fsdp in fsdps for m in fsdp.module.modules()]
    saved = [(m._state_dict_pre_hooks, m._load_state_dict_post_hooks) for m in modules]
    for module in modules:
        module._state_dict_pre_hooks, module._load_state_dict_post_hooks = type(module._state_dict_pre_hooks)(), type(module._load_state_dict_post_hooks)()
    try:
        yield
    finally:
        for module, (pre, post) in zip(modules, saved):
            module._state_dict_pre_hooks, module._load_state_dict_post_hooks = pre, post


def resident_parameter_bytes(chunks) -> int:
    """Bytes of parameter storage this rank holds now for ``chunks``, measured on the storages
    themselves (each counted once): the module's parameters as they stand, the original
    full-size parameters, every weight buffer's shard and the gathered buckets still allocated."""
    seen, total = set(), 0
    for chunk in chunks:
        fsdp = megatron_fsdp(chunk)
        tensors = [p.to_local() if hasattr(p, "to_local") else p for p in fsdp.module.parameters()]
        tensors += list(fsdp.raw_param.values())
        for group in fsdp.param_and_grad_buffer.parameter_groups:
            for buffer in (group.model_weight_buffer, group.main_weight_buffer):
                if buffer is not None:
                    tensors.append(buffer.data)
                    tensors += [bucket.data for bucket in buffer.temporary_bucket_allocator.buckets.values()]
        for tensor in tensors:
            storage = tensor.untyped_storage()
            if storage.nbytes() > 0 and storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


# ---- the two ways, behind one interface ---------------------------------------------------------
class Ddp:
    """Megatron DDP: every rank holds the whole weights of its TP/PP slice; the frozen roles are
    plain modules, and the optimizer (distributed or not) is checkpointed as it is."""

    def __init__(self, distributed_optimizer: bool):
        self.distributed_optimizer = distributed_optimizer
        self.student = None

    def wrap(self, student: list) -> list:
        """The trainable chunks, wrapped; remembered for ``copy_student_to``."""
        self.student = student
        return wrap_ddp(student, self.distributed_optimizer)

    def frozen(self, chunks: list) -> list:
        """A frozen role's chunks, frozen and ready to run."""
        freeze(chunks)
        return chunks

    def copy_student_to(self, role: list) -> None:
        copy_weights(self.student, role)

    def checkpointed_optimizer(self, optimizer):
        """The optimizer as checkpoints see it."""
        return optimizer

    def whole_weights(self, chunks: list, write: bool = False):
        """A block in which ``chunks`` hold whole tensors for checkpoint I/O: they always do."""
        return contextlib.nullcontext()

    def after_student_load(self, optimizer) -> None:
        """After the student's weights were loaded from a weights-only checkpoint: the optimizer
        copied the model's parameters into its main params at construction; refresh them."""
        optimizer.reload_model_params()

    def after_resume(self, checkpointed_optimizer) -> None:
        """After ``checkpointed_optimizer`` was loaded from a trainer checkpoint: nothing left to do."""

    def after_forward_only(self, chunks: list) -> None:
        """After a forward without backward (an evaluation): nothing is left gathered."""


class Fsdp:
    """Megatron-FSDP: the student and every frozen role sharded over the data-parallel group
    (see the module's docstring); checkpoints still hold whole tensors in the DDP format."""

    def __init__(self):
        self.wrapped = None

    def wrap(self, student: list) -> list:
        self.wrapped = wrap_fsdp(student)
        return self.wrapped

    def frozen(self, chunks: list) -> list:
        freeze(chunks)
        return shard_frozen(chunks)

    def copy_student_to(self, role: list) -> None:
        """Shard by shard, no gather (student and role share one buffer layout)."""
        copy_shards(self.wrapped, role)

    def checkpointed_optimizer(self, optimizer):
        """The optimizer's shards in the format DDP runs write (``FsdpOptimizerState``)."""
        return FsdpOptimizerState(optimizer, self.wrapped)

    def whole_weights(self, chunks: list, write: bool = False):
        return gathered_weights(chunks, write)

    def after_student_load(self, optimizer) -> None:
        """Nothing: ``whole_weights(write=True)`` wrote the loaded weights into the main-weight
        shards already (and Megatron-FSDP has no model-to-main copy: a no-op up to 0.18,
        NotImplementedError from 0.19)."""

    def after_resume(self, checkpointed_optimizer) -> None:
        """Once the gathered weights are released: the fp32 main weights as saved."""
        checkpointed_optimizer.finish_load()

    def after_forward_only(self, chunks: list) -> None:
        """A forward without backward leaves the embedding, output layer and final norm gathered
        (the backward would release them): release them, as the frozen roles do after each forward."""
        for chunk in chunks:
            release_gathered(chunk)


def choose(cfg: RunConfig) -> Ddp | Fsdp:
    """The run's way of holding weights, chosen once."""
    return Fsdp() if cfg.parallel.fsdp else Ddp(cfg.optim.distributed_optimizer)
