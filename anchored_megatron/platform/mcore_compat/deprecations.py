"""The deprecation notices particular Megatron-Core releases print on the paths this project drives.

The notices every supported release prints alike (TE/apex fallbacks, torch's deprecated names that
Megatron calls) are in ``platform/warnings_filter.py``, whose ``install`` installs these too.

Each one below is raised by Megatron's own code about Megatron's own internals (or by torch about
an API Megatron calls), repeats on every rank and often on every model built, and asks nothing of
a user of this project. They are silenced by exact message, nothing broader: a notice not in the
table still reaches the user, and so does every other warning from the same modules. The
warning filters are appended, so a user's own ``-W`` / ``PYTHONWARNINGS`` choices still win.
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass


@dataclass(frozen=True)
class Notice:
    message: str  # regular expression matched at the start of the message
    releases: str
    why: str
    category: type[Warning] | None = None  # a warnings.warn notice; None for a logging one
    logger: str | None = None  # the logger a logging notice comes from


NOTICES = (
    Notice(r"Warning: tp_group is None, using default tp group", "0.16.1-0.19.2",
           "GPTModel builds its output layer without a tp_group", DeprecationWarning),
    Notice(r"MLP requires ffn_hidden_size, but it was not provided", "0.16.1-0.19.2",
           "Megatron's own layer spec builds the MLP without it", DeprecationWarning),
    Notice(r"The following imports from `dynamic_context.py` will be removed", "0.16.1-0.19.2",
           "printed when megatron.core.inference is imported", DeprecationWarning),
    Notice(r"The 'megatron.core.transformer.custom_layers.transformer_engine'\s+module is deprecated", "0.16",
           "printed when Megatron's own multi-latent attention module is imported", DeprecationWarning),
    Notice(r"MimoModelConfig is experimental", "0.19",
           "printed when megatron.core.models is imported", UserWarning),
    Notice(r"`torch.jit.script_method` is deprecated", "0.16.1-0.19.2",
           "torch, about the jit-scripted fusions Megatron defines at import", DeprecationWarning),
    Notice(r"The argument order of load has been changed", "0.19",
           "torch, about the call 0.19 makes to read the common state", UserWarning),
    Notice(r"torch.distributed is disabled, unavailable or uninitialized, assuming the intent is to load in a single "
           r"process", "0.19", "0.19 reads the common state with no_dist=True, on purpose", UserWarning),
    Notice(r"GPTModel IS DEPRECATED", "0.19",
           "logged for every GPTModel built; GPTModel keeps working and receives bug fixes",
           logger="megatron.core.models.gpt.gpt_model"),
    Notice(r"DistributedDataParallel: full_param_layout not provided", "0.19",
           "DDP computes the layout itself, as in earlier releases",
           logger="megatron.core.distributed.distributed_data_parallel"),
    Notice(r"MCore's async save is deprecated", "0.19",
           "logged by every synchronous save too", logger="megatron.core.dist_checkpointing.strategies.torch"),
)


class _DropNotices(logging.Filter):
    def __init__(self, patterns: list[str]):
        super().__init__()
        self._pattern = re.compile("|".join(f"(?:{p})" for p in patterns))

    def filter(self, record: logging.LogRecord) -> bool:
        return not self._pattern.match(record.getMessage())


_filters: dict[str, _DropNotices] = {}


def silence_known_deprecations() -> None:
    """Install the filters (idempotent). Call before Megatron is imported to catch import-time ones."""
    for notice in NOTICES:
        if notice.category is not None:
            warnings.filterwarnings("ignore", message=notice.message, category=notice.category, append=True)
    by_logger: dict[str, list[str]] = {}
    for notice in NOTICES:
        if notice.logger is not None:
            by_logger.setdefault(notice.logger, []).append(notice.message)
    for name, patterns in by_logger.items():
        if name not in _filters:
            _filters[name] = _DropNotices(patterns)
            logging.getLogger(name).addFilter(_filters[name])
