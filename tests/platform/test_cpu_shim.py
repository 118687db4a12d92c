"""The CPU shim changes nothing when CUDA is available and maps CUDA placements to CPU otherwise."""

import pytest
import torch


class _AllocatesOnTheCudaDeviceInBackward(torch.autograd.Function):
    """Like Megatron's all-to-all: its backward makes a tensor on ``torch.cuda.current_device()``."""

    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        return torch.empty(grad.shape, device=torch.cuda.current_device()).copy_(grad) * 2


def _shim_behaviour():
    from megatron.core.tensor_parallel import random as mrandom

    from anchored_megatron.platform import cpu_shim

    before = {
        "current_device": torch.cuda.current_device,
        "synchronize": torch.cuda.synchronize,
        "Stream": torch.cuda.Stream,
        "get_rng": mrandom._get_cuda_rng_state,
        "engine": torch.autograd._engine_run_backward,
    }
    real_is_available = torch.cuda.is_available
    torch.cuda.is_available = lambda: True  # what a GPU node reports
    try:
        installed_with_cuda = cpu_shim.install()
        inert = {
            "installed": installed_with_cuda,
            "functions_untouched": torch.cuda.current_device is before["current_device"]
            and torch.cuda.synchronize is before["synchronize"]
            and torch.cuda.Stream is before["Stream"]
            and mrandom._get_cuda_rng_state is before["get_rng"]
            and torch.autograd._engine_run_backward is before["engine"],
            "no_torch_function_mode": torch._C._len_torch_function_stack() == 0,
            "type_name": torch.zeros(1).type(),
        }
    finally:
        torch.cuda.is_available = real_is_available

    active = {"installed": cpu_shim.install()}
    active["zeros_device"] = torch.zeros(2, device="cuda").device.type
    active["int_device"] = torch.empty(3, device=torch.cuda.current_device()).device.type
    x = torch.ones(2)
    active["cuda_is_identity"] = x.cuda() is x
    active["to_cuda_device"] = x.to("cuda:0").device.type
    active["type_name"] = x.type()
    active["bf16_type_name"] = x.bfloat16().type()
    active["int_type_name"] = torch.zeros(1, dtype=torch.int64).type()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    end.record()
    active["elapsed_ms_nonnegative"] = end.elapsed_time(start) <= 0 <= start.elapsed_time(end)
    state = torch.cuda.get_rng_state()
    a = torch.rand(3)
    torch.cuda.set_rng_state(state)
    active["rng_roundtrip"] = torch.equal(a, torch.rand(3))
    leaf = torch.ones(3, requires_grad=True)
    _AllocatesOnTheCudaDeviceInBackward.apply(leaf).sum().backward()
    active["backward_grad"] = leaf.grad.tolist()
    (grad,) = torch.autograd.grad(_AllocatesOnTheCudaDeviceInBackward.apply(leaf).sum(), [leaf])
    active["autograd_grad"] = grad.tolist()
    cpu_shim.uninstall()
    active["restored"] = (
        torch.cuda.current_device is before["current_device"] and torch._C._len_torch_function_stack() == 0
        and torch.autograd._engine_run_backward is before["engine"]
    )
    return inert, active


@pytest.mark.distributed
def test_shim_is_inert_with_cuda_and_maps_cuda_to_cpu_without(ranks):
    inert, active = ranks(_shim_behaviour, 1)[0]
    assert inert == {"installed": False, "functions_untouched": True, "no_torch_function_mode": True, "type_name": "torch.FloatTensor"}
    assert active == {
        "installed": True,
        "zeros_device": "cpu",
        "int_device": "cpu",
        "cuda_is_identity": True,
        "to_cuda_device": "cpu",
        "type_name": "torch.cuda.FloatTensor",
        "bf16_type_name": "torch.cuda.BFloat16Tensor",
        "int_type_name": "torch.LongTensor",
        "elapsed_ms_nonnegative": True,
        "rng_roundtrip": True,
        "backward_grad": [2.0, 2.0, 2.0],
        "autograd_grad": [2.0, 2.0, 2.0],
        "restored": True,
    }
