"""Checkpoint metadata is read without executing arbitrary pickle.

torch.distributed.checkpoint stores each checkpoint's ``.metadata`` as a pickle and reads it
with ``pickle.load``; a crafted file could run code on every rank that loads it. Tensor data
and the common state already go through ``torch.load(weights_only=True)``. This module swaps
the metadata read for an unpickler that only builds the checkpoint-metadata classes torch
writes there (plus torch.Size and dtypes) and refuses any other global, naming it.
"""

from __future__ import annotations

import io
import pickle

import torch

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

_installed = False


class UnsafeCheckpointError(pickle.UnpicklingError):
    pass


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


def install() -> None:
    """Route torch.distributed.checkpoint's metadata reads through the restricted unpickler."""
    global _installed
    if _installed:
        return
    from torch.distributed.checkpoint import filesystem

    filesystem.pickle = _PickleModule
    _installed = True
