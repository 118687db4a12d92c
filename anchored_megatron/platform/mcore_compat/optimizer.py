"""Loading the distributed optimizer's checkpoint with torch Adam (megatron-core 0.16.1 - 0.19.2).

Without apex or Transformer Engine the distributed optimizer wraps ``torch.optim.AdamW``,
whose per-parameter ``step`` tensor upstream does not handle on checkpoint load. Three bugs,
all on that path only, all still present in 0.19.2 (each was checked there by running the
TP=2 x DP=2 -> TP=1 resume test with that one fix switched off):

1. ``sharded_state_dict(is_loading=True)`` on an optimizer that never stepped
   asserts that a ``step`` exists (there is no state yet).
2. ``_set_main_param_and_optimizer_states`` copies every state key, ``step``
   included, from a dict that has none: ``KeyError: 'step'``.
3. After ``load_state_dict`` every parameter's state holds the SAME ``step``
   tensor, so AdamW bumps it once per parameter per step and bias correction is
   silently wrong from then on.

They apply whenever Megatron itself decided it has neither apex nor TE
(``HAVE_APEX_OR_TE``), independent of CPU or GPU.
"""

from __future__ import annotations

import functools

import torch

_applied = False


def _init_empty_adam_state(optimizer: torch.optim.Optimizer) -> None:
    # Zero moments and step 0, i.e. exactly the state AdamW would create lazily;
    # running a dummy step instead would move weights through weight decay.
    for group in optimizer.param_groups:
        for param in group["params"]:
            if param in optimizer.state and optimizer.state[param]:
                continue
            optimizer.state[param] = {
                "step": torch.zeros((), dtype=torch.float32),
                "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format),
            }


def _unshare_steps(optimizer: torch.optim.Optimizer) -> None:
    for state in optimizer.state.values():
        if "step" in state and torch.is_tensor(state["step"]):
            state["step"] = state["step"].detach().clone()


def apply() -> bool:
    """Patch DistributedOptimizer in place; returns True if the patches apply."""
    global _applied
    from megatron.core.optimizer import distrib_optimizer as dopt

    if dopt.HAVE_APEX_OR_TE:
        return False
    if _applied:
        return True
    cls = dopt.DistributedOptimizer

    original_sharded_state_dict = cls.sharded_state_dict

    @functools.wraps(original_sharded_state_dict)
    def sharded_state_dict(self, *args, **kwargs):
        is_loading = kwargs.get("is_loading", args[1] if len(args) > 1 else False)
        if is_loading and isinstance(self.optimizer, torch.optim.Optimizer):
            _init_empty_adam_state(self.optimizer)
        return original_sharded_state_dict(self, *args, **kwargs)

    original_set_states = cls._set_main_param_and_optimizer_states

    @functools.wraps(original_set_states)
    def set_main_param_and_optimizer_states(self, model_param, tensors):
        if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return original_set_states(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        destinations = {"param": main_param, **self.optimizer.state[main_param]}
        for key, value in tensors.items():
            if key != "step":
                destinations[key].copy_(value)

    original_load_state_dict = cls.load_state_dict

    @functools.wraps(original_load_state_dict)
    def load_state_dict(self, state_dict):
        original_load_state_dict(self, state_dict)
        if isinstance(self.optimizer, torch.optim.Optimizer):
            _unshare_steps(self.optimizer)

    cls.sharded_state_dict = sharded_state_dict
    cls._set_main_param_and_optimizer_states = set_main_param_and_optimizer_states
    cls.load_state_dict = load_state_dict
    _applied = True
    return True
