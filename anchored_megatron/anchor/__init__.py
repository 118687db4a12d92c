"""The method alone: the vocab-parallel anchored loss (on logits, or fused with the output layer),
its chunk-size policy (``chunks``) and the anchor-strength schedules.

The names below are imported on first use, so that importing a torch-free module of this package
(``chunks``, ``schedules``; the memory planner reads the first) does not import torch.
"""

import importlib

# name -> the module of this package that defines it
_EXPORTS = {
    "ALPHA_SCHEDULES": "schedules",
    "DIVERGENCES": "loss",
    "INTERPOLATIONS": "loss",
    "METRIC_NAMES": "loss",
    "alpha_at": "schedules",
    "fused_output_anchored_loss": "fused_output",
    "vocab_parallel_anchored_loss": "loss",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
