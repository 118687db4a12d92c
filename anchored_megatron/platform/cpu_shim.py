"""Run Megatron-Core on CPU (gloo) when CUDA is absent.

Megatron-Core assumes a GPU in a handful of places: tensors created with
``device="cuda"`` or ``device=torch.cuda.current_device()``, ``.cuda()`` calls,
stream/event objects, the CUDA RNG tracker, and optimizer asserts that a tensor's
``type()`` is ``torch.cuda.FloatTensor``. This module neutralises exactly those
when, and only when, CUDA is unavailable, in forward and in backward alike. With CUDA
present ``install()`` is a no-op, so the same code path runs unchanged on a GPU cluster.
"""

from __future__ import annotations

import functools
import threading
import time
from contextlib import contextmanager

import torch
from torch.overrides import TorchFunctionMode

_lock = threading.Lock()
_installed = False
_mode: "_CudaToCpuMode | None" = None
_saved_cuda_attrs: dict[str, object] = {}

_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


def _is_cuda_device(device) -> bool:
    # An int device means a CUDA ordinal in torch's factory calls.
    if isinstance(device, bool):
        return False
    if isinstance(device, int):
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


class _CudaToCpuMode(TorchFunctionMode):
    """Maps CUDA placements to CPU for every torch call made on this thread."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return _CUDA_TYPE_NAMES.get(name, name)
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = dict(kwargs, device="cpu")
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        if kwargs.get("pin_memory"):
            kwargs = dict(kwargs, pin_memory=False)
        return func(*args, **kwargs)


class _CpuStream:
    """Stand-in for torch.cuda.Stream: CPU work is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        event = event or _CpuEvent()
        event.record()
        return event

    def synchronize(self):
        pass

    def query(self):
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _CpuEvent:
    """Stand-in for torch.cuda.Event; elapsed_time is wall time in ms."""

    def __init__(self, *args, **kwargs):
        self._time = None

    def record(self, stream=None):
        self._time = time.perf_counter()

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, end):
        return (end._time - self._time) * 1000.0


@contextmanager
def _stream_context(stream=None):
    yield


# torch.compile's trace rules index torch.* objects by identity, so every patched
# attribute needs its own function object.
def _noop():
    return lambda *args, **kwargs: None


def _zero():
    return lambda *args, **kwargs: 0


def _cuda_stand_ins() -> dict[str, object]:
    return {
        "current_device": _zero(),
        "device_count": lambda: 1,
        "set_device": _noop(),
        "synchronize": _noop(),
        "empty_cache": _noop(),
        "current_stream": lambda *a, **k: _CpuStream(),
        "default_stream": lambda *a, **k: _CpuStream(),
        "Stream": _CpuStream,
        "Event": _CpuEvent,
        "stream": _stream_context,
        "set_stream": _noop(),
        "memory_allocated": _zero(),
        "max_memory_allocated": _zero(),
        "memory_reserved": _zero(),
        "reset_peak_memory_stats": _noop(),
        "memory_stats": lambda *a, **k: {},
        # The CUDA RNG tracker forks/restores "the device generator": on CPU that is
        # the CPU generator, so TP-region dropout still gets its own stream.
        "get_rng_state": lambda *a, **k: torch.get_rng_state(),
        "set_rng_state": lambda state, *a, **k: torch.set_rng_state(state),
        # torch.manual_seed itself calls torch.cuda.manual_seed_all: seed the CPU
        # generator directly to avoid recursing.
        "manual_seed": lambda seed: torch.default_generator.manual_seed(int(seed)),
    }


def _patch_megatron_rng() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    _saved_cuda_attrs["megatron._get_cuda_rng_state"] = mrandom._get_cuda_rng_state
    _saved_cuda_attrs["megatron._set_cuda_rng_state"] = mrandom._set_cuda_rng_state
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)


def _patch_nvtx() -> None:
    nvtx = torch.cuda.nvtx
    for name in ("range_push", "range_pop", "mark"):
        _saved_cuda_attrs[f"nvtx.{name}"] = getattr(nvtx, name)
        setattr(nvtx, name, _noop())


def _engine_under_mode(run_backward):
    """The autograd engine entry, run with a CUDA-to-CPU mode on the stack.

    ``loss.backward()`` and ``torch.autograd.backward`` are torch functions, so the mode
    handles them, and a mode is off while its own handler runs: the engine would then
    capture a mode stack without it, and an autograd Function whose backward allocates on
    ``torch.cuda.current_device()`` (Megatron's all-to-all for MoE tokens) fails. The entry
    points cannot simply re-push the mode (every nested entry point would be handled, and
    the mode popped, again); the engine entry below them is a plain function.
    """

    @functools.wraps(run_backward)
    def run(*args, **kwargs):
        if any(isinstance(mode, _CudaToCpuMode) for mode in _function_mode_stack()):
            return run_backward(*args, **kwargs)
        with _CudaToCpuMode():
            return run_backward(*args, **kwargs)

    return run


def _function_mode_stack() -> list:
    from torch.overrides import _get_current_function_mode_stack

    return _get_current_function_mode_stack()


def _patch_autograd_engine() -> None:
    # torch.autograd.backward and torch.autograd.grad call the engine through this name.
    _saved_cuda_attrs["autograd._engine_run_backward"] = torch.autograd._engine_run_backward
    torch.autograd._engine_run_backward = _engine_under_mode(torch.autograd._engine_run_backward)


def install() -> bool:
    """Neutralise Megatron-Core's CUDA assumptions on this thread.

    Returns True when the CPU shim is active, False when CUDA is available and
    nothing was changed. Idempotent.
    """
    global _installed, _mode
    if torch.cuda.is_available():
        return False
    with _lock:
        if _installed:
            return True
        for name, stand_in in _cuda_stand_ins().items():
            _saved_cuda_attrs[name] = getattr(torch.cuda, name, None)
            setattr(torch.cuda, name, stand_in)
        _patch_nvtx()
        _patch_megatron_rng()
        _patch_autograd_engine()
        _mode = _CudaToCpuMode()
        _mode.__enter__()
        _installed = True
    return True


def uninstall() -> None:
    """Undo ``install()`` (used by tests)."""
    global _installed, _mode
    with _lock:
        if not _installed:
            return
        _mode.__exit__(None, None, None)
        _mode = None
        from megatron.core.tensor_parallel import random as mrandom

        for name, value in _saved_cuda_attrs.items():
            if name.startswith("megatron."):
                setattr(mrandom, name.split(".", 1)[1], value)
            elif name.startswith("nvtx."):
                setattr(torch.cuda.nvtx, name.split(".", 1)[1], value)
            elif name.startswith("autograd."):
                setattr(torch.autograd, name.split(".", 1)[1], value)
            elif value is None:
                delattr(torch.cuda, name)
            else:
                setattr(torch.cuda, name, value)
        _saved_cuda_attrs.clear()
        _installed = False


def is_installed() -> bool:
    return _installed
