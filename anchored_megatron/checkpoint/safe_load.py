"""Checkpoints are read without executing arbitrary pickle.

Three places in a dist_checkpointing load unpickle data from the checkpoint:

- torch.distributed.checkpoint's ``.metadata`` is read with ``pickle.load``: swapped for an
  unpickler that only builds the checkpoint-metadata classes torch writes there (plus
  torch.Size and dtypes) and refuses any other global, naming it.
- Megatron's ``common.pt`` is read with ``torch.load`` without ``weights_only``, so its safety
  rests on torch's default (weights-only since 2.6) and ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``
  turns it into a full unpickle: the common-state strategy is replaced by one that passes
  ``weights_only=True`` (which that variable cannot override).
- ShardedObjects inside the ``.distcp`` shards go through the torch planner's ``load_bytes``,
  which calls ``torch.load(weights_only=False)`` unconditionally: every object is first
  unpickled weights-only (refusing any global outside torch's allowlist) before Megatron's
  planner builds it.

On top of that, ``refuse_unsafe_torch_load`` refuses to load a checkpoint at all while
``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` is set: any remaining default ``torch.load`` (Megatron's,
a library's) would then run arbitrary code from the files.
"""

from __future__ import annotations

import io
import os
import pickle

import torch

from anchored_megatron.checkpoint.errors import CheckpointError

_ALLOWED_MODULES = (
    "torch.distributed.checkpoint.metadata",
    "torch.distributed.checkpoint.planner",
    "torch.distributed.checkpoint.filesystem",
)
_ALLOWED_GLOBALS = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
}
FORCE_UNSAFE_VARIABLE = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"
_TRUE = ("1", "y", "yes", "true")  # the values torch.load treats as set

_installed = False


class UnsafeCheckpointError(CheckpointError, pickle.UnpicklingError):
    """A checkpoint's metadata refers to a class no such file holds (an unpickling error too, as
    raised inside a pickle load)."""


class UnsafeLoadSettingError(CheckpointError):
    """The environment would make torch.load unpickle arbitrary objects."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module in _ALLOWED_MODULES or (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeCheckpointError(
            f"checkpoint metadata refers to {module}.{name}, which a torch.distributed.checkpoint "
            "metadata file never holds: refusing to load it (the file may have been tampered with)"
        )


def restricted_load(file) -> object:
    """``pickle.load`` limited to checkpoint-metadata classes."""
    return _MetadataUnpickler(file).load()


class _PickleModule:
    """What torch's filesystem reader/writer see as ``pickle``: safe load, normal dump."""

    dump = staticmethod(pickle.dump)
    dumps = staticmethod(pickle.dumps)
    load = staticmethod(restricted_load)
    HIGHEST_PROTOCOL = pickle.HIGHEST_PROTOCOL

    @staticmethod
    def loads(data: bytes):
        return restricted_load(io.BytesIO(data))


def refuse_unsafe_torch_load(path: str) -> None:
    """Raise when ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` would let ``torch.load`` run code from ``path``."""
    if os.environ.get(FORCE_UNSAFE_VARIABLE, "0").lower() in _TRUE:
        raise UnsafeLoadSettingError(
            f"{FORCE_UNSAFE_VARIABLE} is set: torch.load would unpickle arbitrary objects, so a crafted "
            f"file in {path} could run code; refusing to load it. Unset {FORCE_UNSAFE_VARIABLE}."
        )


def _weights_only_first(load_bytes):
    def checked_load_bytes(self, read_item, value):
        # Older Transformer Engine versions store their extra state as a BytesIO (inert bytes).
        with torch.serialization.safe_globals([io.BytesIO]):
            torch.load(value, weights_only=True)
        value.seek(0)
        return load_bytes(self, read_item, value)

    return checked_load_bytes


def install() -> None:
    """Route every unpickling step of a dist_checkpointing load through a restricted loader."""
    global _installed
    if _installed:
        return
    from megatron.core.dist_checkpointing.strategies.torch import MCoreLoadPlanner
    from torch.distributed.checkpoint import filesystem

    from anchored_megatron.checkpoint.mcore_format import load_common_state_weights_only

    filesystem.pickle = _PickleModule
    load_common_state_weights_only()
    MCoreLoadPlanner.load_bytes = _weights_only_first(MCoreLoadPlanner.load_bytes)
    _installed = True
