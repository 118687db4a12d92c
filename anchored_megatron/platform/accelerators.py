"""What this machine offers: CUDA, FP8-capable GPUs, Transformer Engine, apex and its CUDA kernels.

Every check is a plain module-level function that imports lazily (importing Transformer
Engine costs seconds and can fail in odd ways on a mismatched install), so a CPU-only
machine never pays for it and tests fake availability with ``monkeypatch.setattr``.
Callers must look the functions up through the module (``accelerators.has_cuda()``), not
import the names, or the fakes would not reach them.
"""

from __future__ import annotations

import functools
import importlib

import torch

INSTALL_TRANSFORMER_ENGINE = (
    "install NVIDIA Transformer Engine on a CUDA machine: "
    "`pip install --no-build-isolation 'transformer_engine[pytorch]'` (it compiles against the installed "
    "PyTorch and CUDA), or run in an NVIDIA PyTorch container (nvcr.io/nvidia/pytorch:<yy.mm>-py3), which ships it"
)

# apex's compiled extensions Megatron-Core uses, by what they fuse.
APEX_EXTENSIONS = {
    "gradient_accumulation_fusion": "fused_weight_gradient_mlp_cuda",
    "masked_softmax_fusion": "scaled_upper_triang_masked_softmax_cuda",
    "fused_adam": "amp_C",
}

# FP8 tensor cores: Ada (8.9) and Hopper (9.0) or newer.
FP8_MIN_CAPABILITY = (8, 9)


def has_cuda() -> bool:
    return torch.cuda.is_available()


def cuda_capability() -> tuple[int, int] | None:
    return tuple(torch.cuda.get_device_capability()) if has_cuda() else None


def supports_fp8() -> bool:
    capability = cuda_capability()
    return capability is not None and capability >= FP8_MIN_CAPABILITY


@functools.cache
def _import(name: str) -> tuple[object | None, str | None]:
    """(module, None) or (None, why it failed). Cached: a failed import is not retried."""
    try:
        return importlib.import_module(name), None
    except Exception as exc:  # noqa: BLE001 - a broken install raises OSError/RuntimeError too
        return None, f"{type(exc).__name__}: {exc}".strip()


def transformer_engine_version() -> str | None:
    module, _ = _import("transformer_engine.pytorch")
    if module is None:
        return None
    te, _ = _import("transformer_engine")
    return str(getattr(te, "__version__", "unknown"))


def has_transformer_engine() -> bool:
    return transformer_engine_version() is not None


def transformer_engine_import_error() -> str | None:
    """Why ``import transformer_engine.pytorch`` failed (None when it works)."""
    return _import("transformer_engine.pytorch")[1]


def has_apex() -> bool:
    return _import("apex")[0] is not None


def has_apex_extension(name: str) -> bool:
    """One of apex's compiled CUDA extensions (``APEX_EXTENSIONS``); never present without CUDA."""
    return has_cuda() and _import(name)[0] is not None


def summary() -> dict:
    """What a log line or a benchmark record should say about this machine."""
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda if has_cuda() else None,
        "device": torch.cuda.get_device_name() if has_cuda() else "cpu",
        "capability": ".".join(map(str, cuda_capability())) if has_cuda() else None,
        "fp8_capable": supports_fp8(),
        "transformer_engine": transformer_engine_version(),
        "apex": has_apex(),
        "apex_extensions": {use: has_apex_extension(name) for use, name in APEX_EXTENSIONS.items()},
    }
