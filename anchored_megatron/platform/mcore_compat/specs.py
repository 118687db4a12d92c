"""Reading Megatron-Core layer specs across releases.

Up to 0.17 a layer spec's ``mlp`` entry is a ``ModuleSpec`` whose ``submodules`` name the linears.
From 0.18 the dense MLP entry is ``functools.partial(MLP.as_mlp_submodule, submodules=...)``: the
same ``MLPSubmodules``, held as a keyword of the partial. Building a model is unaffected (Megatron
builds either form); only code that inspects a spec has to look in the right place.
"""

from __future__ import annotations

import functools


def submodules(entry):
    """The ``submodules`` of one spec entry, whichever form the installed release builds."""
    if isinstance(entry, functools.partial):
        if "submodules" not in entry.keywords:
            raise TypeError(f"layer spec entry {entry!r} is a partial without submodules=")
        return entry.keywords["submodules"]
    return entry.submodules


def mlp_submodules(layer_spec):
    """The ``MLPSubmodules`` (linear_fc1, linear_fc2, ...) of a transformer layer spec."""
    return submodules(layer_spec.submodules.mlp)
