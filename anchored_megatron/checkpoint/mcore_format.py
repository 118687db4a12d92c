"""The torch_dist checkpoint format changed once, one way, in megatron-core 0.19.

Up to 0.18 the common (non-tensor) state is a separate ``common.pt`` beside the torch_dist files.
From 0.19 it is stored inside the torch_dist files and there is no ``common.pt``. 0.19 reads both
formats; 0.16.1 - 0.18 fail on the new one deep inside the load (``FileNotFoundError: common.pt``),
so a checkpoint written by 0.19 is refused up front here, saying what to install.

Reading the common state weights-only differs with it: up to 0.18 ``common.pt`` goes through a
load strategy registered for ``StrategyAction.LOAD_COMMON``; 0.19 has no such registry, reads
the embedded state weights-only itself, and reads a legacy ``common.pt`` with
``serialization.load_common``.

And from 0.18 the torch_dist writer runs in threads and drops a failed write's errno, which is
kept aside (``keep_writer_errors``) so that a full disk can still be told apart. These are the
checkpoint package's part of the differences between releases (``platform.mcore_compat`` holds
the rest); ``checkpoint.install`` applies them.
"""

from __future__ import annotations

import functools
import os

import torch

from anchored_megatron.checkpoint.errors import CheckpointError

COMMON_STATE_FILE = "common.pt"
METADATA_FILE = "metadata.json"
# The first release that reads (and writes) the embedded common state.
EMBEDDED_COMMON_STATE = (0, 19, 0)


class CheckpointFormatError(CheckpointError):
    """The installed Megatron-Core cannot read this checkpoint's format."""


def reads_embedded_common_state() -> bool:
    from anchored_megatron.platform.mcore_compat import version

    # The older releases are fixed history: their number says exactly what they cannot read.
    return version() >= EMBEDDED_COMMON_STATE


def is_embedded_common_state_format(checkpoint_dir: str) -> bool:
    """Whether ``checkpoint_dir`` is in the 0.19 format. Told by its metadata.json, not by a
    missing common.pt (a deleted file is damage, not a format): up to 0.18 it names the common
    state's backend (``common_backend``), from 0.19 there is none to name."""
    import json

    try:
        with open(os.path.join(checkpoint_dir, METADATA_FILE)) as fh:
            config = json.load(fh)
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "sharded_backend" in config and "common_backend" not in config


def check_readable(checkpoint_dir: str) -> None:
    """Raise CheckpointFormatError when the installed Megatron-Core cannot read ``checkpoint_dir``."""
    if reads_embedded_common_state():
        return
    if not is_embedded_common_state_format(checkpoint_dir):
        return  # the older format, or not a dist checkpoint at all: the loader's own error says what is wrong
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


# ---- the torch_dist writer's errors -----------------------------------------------------------
_writer_errors: list[BaseException] = []


def keep_writer_errors() -> bool:
    """Keep the exceptions of the torch_dist writer's workers for ``take_writer_errors``.

    From 0.18 the writer runs in threads of the saving process and turns a worker's exception
    into ``RuntimeError("... error: <class 'OSError'>")``: the errno is gone, and with it the
    difference between a full disk and any other failure. Earlier releases write in child
    processes whose error text keeps the errno ("[Errno 28] ..."), which needs nothing.
    Returns whether the recorder was installed (idempotent)."""
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    if hasattr(FileSystemWriterAsync, "write_preloaded_data_multiproc"):
        return False
    original = FileSystemWriterAsync.__dict__["write_preloaded_data"]
    if getattr(original.__func__, "_keeps_errors", False):
        return True
    write = original.__func__

    def write_preloaded_data(*args, **kwargs):
        results_queue = kwargs.get("results_queue")
        output = write(*args, **kwargs)
        if output is not None and isinstance(output[1], BaseException):
            _writer_errors.append(output[1])
        elif results_queue is not None:
            # A worker thread put (index, results or exception) on the queue instead of returning it.
            for item in list(results_queue.queue):
                if isinstance(item[1], BaseException) and item[1] not in _writer_errors:
                    _writer_errors.append(item[1])
        return output

    replacement = staticmethod(functools.wraps(write)(write_preloaded_data))
    replacement.__func__._keeps_errors = True
    FileSystemWriterAsync.write_preloaded_data = replacement
    return True


def take_writer_errors() -> list[BaseException]:
    """The writer exceptions recorded since the last call (see ``keep_writer_errors``)."""
    errors = list(_writer_errors)
    _writer_errors.clear()
    return errors
