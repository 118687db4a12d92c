"""Expert-parallel MoE without Transformer Engine.

- ``te_general_gemm``: megatron-core 0.16.x imports it from TE inside a ``try`` and never
  defines it when TE is missing, yet the router's gating linear tests ``te_general_gemm is not
  None``: every MoE forward raises NameError. 0.17+ sets it to None; so do we, where it is absent.
- ``maybe_move_tensor_to_cpu(..., as_numpy=True)``: the alltoall token dispatcher turns its
  split sizes into numpy arrays through it, but it converts only CUDA tensors; split sizes that
  already live on the CPU stay tensors and ``all_to_all_single`` rejects them (TypeError). Every
  release up to 0.19.2; the wrapper converts CPU tensors too and leaves CUDA ones to Megatron.
"""

from __future__ import annotations

import functools

import torch

_applied: dict[str, bool] = {}


def _define_te_general_gemm() -> bool:
    from megatron.core.transformer.moe import moe_utils

    if hasattr(moe_utils, "te_general_gemm"):
        return False
    moe_utils.te_general_gemm = None
    return True


def _splits_stay_tensors(move) -> bool:
    return torch.is_tensor(move(torch.ones(1, dtype=torch.int64), as_numpy=True))


def _convert_cpu_split_sizes() -> bool:
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    original = moe_utils.maybe_move_tensor_to_cpu
    if not _splits_stay_tensors(original):
        return False

    @functools.wraps(original)
    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if as_numpy and torch.is_tensor(tensor) and tensor.device.type == "cpu":
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    return True


def apply() -> dict[str, bool]:
    """Install the MoE workarounds this release needs; returns {name: applied}. Idempotent."""
    if not _applied:
        _applied["te_general_gemm"] = _define_te_general_gemm()
        _applied["cpu_split_sizes"] = _convert_cpu_split_sizes()
    return dict(_applied)
