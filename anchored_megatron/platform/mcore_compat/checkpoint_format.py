"""The torch_dist checkpoint format changed once, one way, in megatron-core 0.19.

Up to 0.18 the common (non-tensor) state is a separate ``common.pt`` beside the torch_dist files.
From 0.19 it is stored inside the torch_dist files and there is no ``common.pt``. 0.19 reads both
formats; 0.16.1 - 0.18 fail on the new one deep inside the load (``FileNotFoundError: common.pt``),
so a checkpoint written by 0.19 is refused up front here, saying what to install.

Reading the common state weights-only differs with it: up to 0.18 ``common.pt`` goes through a
load strategy registered for ``StrategyAction.LOAD_COMMON``; 0.19 has no such registry, reads
the embedded state weights-only itself, and reads a legacy ``common.pt`` with
``serialization.load_common``.
"""

from __future__ import annotations

import os

import torch

COMMON_STATE_FILE = "common.pt"
METADATA_FILE = "metadata.json"
# The first release that reads (and writes) the embedded common state.
EMBEDDED_COMMON_STATE = (0, 19, 0)


class CheckpointFormatError(RuntimeError):
    pass


def reads_embedded_common_state() -> bool:
    from anchored_megatron.platform.mcore_compat import version

    # The older releases are fixed history: their number says exactly what they cannot read.
    return version() >= EMBEDDED_COMMON_STATE


def check_readable(checkpoint_dir: str) -> None:
    """Raise CheckpointFormatError when the installed Megatron-Core cannot read ``checkpoint_dir``."""
    if reads_embedded_common_state():
        return
    if not os.path.isfile(os.path.join(checkpoint_dir, METADATA_FILE)):
        return  # not a dist checkpoint at all: the loader's own error says so
    if os.path.exists(os.path.join(checkpoint_dir, COMMON_STATE_FILE)):
        return
    from anchored_megatron.platform.mcore_compat import version_string

    raise CheckpointFormatError(
        f"{checkpoint_dir}: this checkpoint was written by megatron-core 0.19 or newer (its common state is inside "
        f"the torch_dist files; there is no {COMMON_STATE_FILE}), which megatron-core {version_string()} cannot read. "
        "Load it with megatron-core 0.19: pip install 'megatron-core>=0.19,<0.20' (on Python 3.11 add "
        "--no-deps --ignore-requires-python; `make setup MEGATRON_CORE=0.19.2` builds such a venv)"
    )


def load_common_state_weights_only() -> None:
    """Make Megatron read every common state with ``torch.load(weights_only=True)`` passed
    explicitly: its own call relies on torch's default, which TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD
    turns into a full unpickle of a file anyone who can write the checkpoint controls."""
    try:
        from megatron.core.dist_checkpointing.strategies.base import StrategyAction, register_default_strategy
    except ImportError:  # 0.19+: no strategy registry; only the legacy common.pt needs the explicit load
        from megatron.core.dist_checkpointing import serialization

        serialization.load_common = _load_common_pt
        return
    from megatron.core.dist_checkpointing.strategies.common import TorchCommonLoadStrategy

    class WeightsOnlyCommonLoadStrategy(TorchCommonLoadStrategy):
        def load_common(self, checkpoint_dir):
            from megatron.core.msc_utils import MultiStorageClientFeature

            if MultiStorageClientFeature.is_enabled():
                return super().load_common(checkpoint_dir)
            return _load_common_pt(checkpoint_dir)

    register_default_strategy(StrategyAction.LOAD_COMMON, "torch", 1, WeightsOnlyCommonLoadStrategy())


def _load_common_pt(checkpoint_dir) -> dict:
    from megatron.core.dist_checkpointing.mapping import CheckpointingException

    path = os.path.join(checkpoint_dir, COMMON_STATE_FILE)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise CheckpointingException(f"Common file {path} does not exist") from exc
