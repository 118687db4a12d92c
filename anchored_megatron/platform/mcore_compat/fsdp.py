"""Megatron-FSDP (``use_megatron_fsdp``) on gloo and without Transformer Engine.

Two are settings, returned by ``ddp_config_overrides`` for the caller's
``DistributedDataParallelConfig``; two are patches, installed by ``apply``:

- ``gradient_reduce_div_fusion`` (every release to 0.19.2): Megatron-FSDP folds the 1/DP scaling
  into the reduce-scatter as a PREMUL_SUM reduction, which only NCCL implements; elsewhere the
  scaling has to be a separate multiply.
- ``suggested_communication_unit_size`` (every release to 0.19.2): left unset, Megatron derives
  "twice one FSDP unit" and then "caps" it with ``max(1e9, ...)``, so every model below a billion
  parameters is prefetched whole and stays gathered after forward. We pass the intended value.
- ``TELinear`` (0.16 - 0.17): the adapter tests ``isinstance(module, TELinear)`` at TP > 1, and
  without TE that class derives from a MagicMock instance, so the test raises. No module is a
  TELinear without TE: a plain stand-in class answers False. 0.18 compares type names instead.
- Releasing a frozen model's weights (0.19): ``synchronize_param_gather`` keeps the buckets
  outside the FSDP units (embedding, output layer, final norm) gathered for the next step
  (``reset(preserve_non_fsdp_units=True)``), which suits a trained model released after its
  backward, not a frozen role that should hold only its shard between forwards;
  ``release_gathered`` asks for every bucket (0.16 - 0.18 release them all anyway).
- Frozen parameters (0.16): every parameter of an FSDP unit gets a post-accumulate-grad hook,
  which torch refuses for a tensor that does not require grad, so a frozen model cannot be
  wrapped. 0.17 registers hooks only on trainable parameters; so does the patch.
"""

from __future__ import annotations

import functools
import inspect

import torch

# Megatron's own cap on one communication unit, in elements.
COMMUNICATION_UNIT_CAP = 1_000_000_000

_applied: dict[str, bool] = {}


def communication_unit_size(module: torch.nn.Module, unit_types: tuple[type, ...]) -> int:
    """Twice the mean parameter count of one FSDP unit (so one unit runs while the next is
    prefetched), at most ``COMMUNICATION_UNIT_CAP``: what Megatron means to compute."""
    units = [m for m in module.modules() if isinstance(m, unit_types)]
    if not units:
        return COMMUNICATION_UNIT_CAP
    total = sum(p.numel() for unit in units for p in unit.parameters())
    return max(1, min(COMMUNICATION_UNIT_CAP, 2 * total // len(units)))


def ddp_config_overrides(module: torch.nn.Module, backend: str) -> dict:
    """``DistributedDataParallelConfig`` fields for wrapping ``module`` (a GPTModel) in
    Megatron-FSDP on ``backend`` ("nccl" or "gloo")."""
    from megatron.core.transformer.transformer_layer import TransformerLayer

    return {
        "gradient_reduce_div_fusion": backend == "nccl",
        "suggested_communication_unit_size": communication_unit_size(module, (TransformerLayer,)),
    }


def release_gathered(megatron_fsdp) -> None:
    """Free every gathered weight bucket of a ``MegatronFSDP`` and put its sharded parameters
    back in the module."""
    pipeline = megatron_fsdp.all_gather_pipeline
    # A forward prefetches the next bucket; finish it first (Megatron's reset would, with a warning).
    while pipeline.param_gather_event_map:
        pipeline.wait_bucket_ready(*next(iter(pipeline.param_gather_event_map)))
    if "preserve_non_fsdp_units" in inspect.signature(pipeline.reset).parameters:
        pipeline.reset(preserve_non_fsdp_units=False)
    else:
        pipeline.reset()
    megatron_fsdp._replace_param_with_distributed_if_needed()


def _is_instance_check_broken(cls) -> bool:
    try:
        isinstance(torch.nn.Module(), cls)
    except Exception:  # noqa: BLE001 - a MagicMock-derived class raises TypeError or AttributeError
        return True
    return False


class _AbsentTELinear:
    """Stands in for Transformer Engine's linear where TE is not installed: nothing is one."""


def _replace_mock_te_linear() -> bool:
    from megatron.core.distributed.fsdp import mcore_fsdp_adapter

    cls = getattr(mcore_fsdp_adapter, "TELinear", None)
    if cls is None or not _is_instance_check_broken(cls):
        return False
    mcore_fsdp_adapter.TELinear = _AbsentTELinear
    return True


class _NoHook:
    def remove(self) -> None:
        pass


def _skip_hooks_on_frozen_parameters() -> bool:
    from anchored_megatron.platform.mcore_compat import version

    # No probe short of wrapping a frozen model tells the releases apart; the fix landed in 0.17.
    if version() >= (0, 17, 0):
        return False
    from megatron.core.distributed.fsdp.src.megatron_fsdp.megatron_fsdp import MegatronFSDP

    original = MegatronFSDP._register_fsdp_hooks

    @functools.wraps(original)
    def register_fsdp_hooks(self, root_module, *args, **kwargs):
        frozen = [p for p in root_module.parameters() if not p.requires_grad]
        for param in frozen:
            # An instance attribute shadows torch.Tensor's method for this call only.
            param.register_post_accumulate_grad_hook = lambda hook: _NoHook()
        try:
            return original(self, root_module, *args, **kwargs)
        finally:
            for param in frozen:
                del param.register_post_accumulate_grad_hook

    MegatronFSDP._register_fsdp_hooks = register_fsdp_hooks
    return True


def _synchronous_param_gather_without_cuda() -> bool:
    """Without CUDA, Megatron-FSDP's parameter all-gathers (prefetches included) complete before
    they return. On a GPU they run on a side stream that CUDA events order against the compute; on
    CPU those events are the shim's no-ops while gloo runs the collective in its own threads, so
    nothing orders an in-flight gather against Megatron-FSDP's bucket bookkeeping. (With async
    gathers a DP=2 rank died of SIGSEGV in 1 of 3 full CPU test runs, and once raised inside
    ``wait_bucket_ready``; the race is the suspected cause, not a proven one.) With CUDA: untouched."""
    import inspect

    import torch

    if torch.cuda.is_available():
        return False
    from megatron.core.distributed.fsdp.src.megatron_fsdp.param_and_grad_buffer import AllGatherPipeline

    original = AllGatherPipeline.all_gather_params
    signature = inspect.signature(original)

    @functools.wraps(original)
    def all_gather_params(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.arguments["async_param_gather"] = False
        return original(*bound.args, **bound.kwargs)

    AllGatherPipeline.all_gather_params = all_gather_params
    return True


def apply() -> dict[str, bool]:
    """Install the Megatron-FSDP patches this release needs; returns {name: applied}. Idempotent."""
    if not _applied:
        _applied["te_linear_isinstance"] = _replace_mock_te_linear()
        _applied["frozen_parameter_hooks"] = _skip_hooks_on_frozen_parameters()
        _applied["synchronous_param_gather"] = _synchronous_param_gather_without_cuda()
    return dict(_applied)
