"""Peak bytes of the tensors that torch ops create, counted exactly (no allocator, no RSS noise)."""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


class LiveBytes(TorchDispatchMode):
    """Within ``with LiveBytes() as meter:``, ``meter.peak`` is the largest total size of the
    storages that ops in the block allocated and that some tensor still references. Aliases
    (views, ``detach``, ``out=`` and in-place results) count once, with their storage; storages
    that existed before the block are not counted. Compiled graphs allocate outside the
    dispatcher: measure eager code."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._storages: dict[int, list[int]] = {}  # key -> [bytes, tensors referencing it]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        existing = {_storage_key(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor) or tensor.untyped_storage().nbytes() == 0:
                continue
            key = _storage_key(tensor)
            if key in self._storages:
                self._storages[key][1] += 1
            elif key in existing:
                continue
            else:
                size = tensor.untyped_storage().nbytes()
                self._storages[key] = [size, 1]
                self.live += size
                self.peak = max(self.peak, self.live)
            weakref.finalize(tensor, self._release, key)
        return out

    def _release(self, key: int) -> None:
        entry = self._storages[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self._storages[key]
