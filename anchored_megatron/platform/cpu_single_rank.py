"""Two per-step memory passes Megatron-Core makes on CPU that change nothing, left out.

With the distributed optimizer at one data-parallel rank, every step reduce-scatters the gradient
buffer into its own shard and all-gathers the parameter buffer from its own shard: over a one-rank
group both are the identity, their output and input the same memory, yet gloo copies the whole
buffer each time (538 MB apiece for a 135M-parameter model, 82 ms each on 2 cores). And without apex
or Transformer Engine, gradient clipping scales every gradient through Megatron's stand-in
``dst.copy_(src * scale)``: a temporary and a copy where the source is the destination.

``install()`` replaces those three functions where Megatron's modules look them up, with versions
that skip an aliased one-rank collective and scale in place, and defers to the originals in every
other case. Installed by ``platform.initialize`` with the CPU shim, so only without CUDA: on a GPU
node nothing here changes. ``uninstall()`` restores the originals (tests).
"""

from __future__ import annotations

import functools

import torch

_saved: dict[tuple[object, str], object] = {}


class _Done:
    """The work handle of a collective that had nothing to do."""

    def wait(self, timeout=None) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


def _one_rank(group) -> bool:
    return torch.distributed.get_world_size(group) == 1


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.numel() == b.numel() and a.dtype == b.dtype


def _skipping_identity(collective):
    """``collective(output, input, ...)``, skipped when it would copy a buffer onto itself."""

    @functools.wraps(collective)
    def call(output, input, *args, group=None, async_op=False, **kwargs):
        if _same_memory(output, input) and _one_rank(group):
            return _Done() if async_op else None
        return collective(output, input, *args, group=group, async_op=async_op, **kwargs)

    call.skips_identity = True
    return call


def scale_in_place(chunk_size, noop_flag, tensor_lists, scale):
    """``amp_C.multi_tensor_scale``'s contract (``dst = src * scale``) without a temporary."""
    sources, destinations = tensor_lists
    for source, destination in zip(sources, destinations):
        if source is destination:
            destination.mul_(scale)
        else:
            torch.mul(source, scale, out=destination)


def _replace(module, name: str, value) -> None:
    _saved.setdefault((module, name), getattr(module, name))
    setattr(module, name, value)


def install() -> None:
    """Idempotent; call only without CUDA (``platform.initialize`` does)."""
    if _saved:
        return
    from megatron.core import utils as mcore_utils
    from megatron.core.distributed import param_and_grad_buffer as buffers
    from megatron.core.optimizer import clip_grads

    for name in ("dist_all_gather_func", "dist_reduce_scatter_func"):
        current = getattr(buffers, name, None)
        if current is not None and not getattr(current, "skips_identity", False):
            _replace(buffers, name, _skipping_identity(current))
    # Only Megatron's own stand-in: apex's or TE's kernel, when present, is left alone.
    if getattr(clip_grads, "multi_tensor_scale_impl", None) is getattr(mcore_utils, "local_multi_tensor_scale", object()):
        _replace(clip_grads, "multi_tensor_scale_impl", scale_in_place)


def uninstall() -> None:
    for (module, name), value in _saved.items():
        setattr(module, name, value)
    _saved.clear()
