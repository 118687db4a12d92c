"""How the frozen roles run their forward: under inference_mode for plain PyTorch modules (no
autograd bookkeeping at all), under no_grad where a role holds Transformer Engine modules."""

import torch

from anchored_megatron.training.roles import RoleStack


class _Chunk(torch.nn.Module):
    config = None
    post_process = True  # a last pipeline stage

    def __init__(self, linear=None):
        super().__init__()
        self.linear = linear if linear is not None else torch.nn.Linear(3, 3)

    def forward(self, x):
        return self.linear(x)


class _TELinear(torch.nn.Linear):
    pass


_TELinear.__module__ = "transformer_engine.pytorch.module.linear"  # where TE's modules are defined


def _frozen_output(stack):
    output = stack(torch.randn(2, 3))
    assert output.requires_grad  # the student keeps its autograd graph either way
    (frozen,) = stack.take_frozen_outputs()
    return frozen


def test_plain_frozen_roles_run_under_inference_mode():
    frozen = _frozen_output(RoleStack(_Chunk(), [_Chunk()]))
    assert frozen.is_inference() and not frozen.requires_grad


def test_frozen_roles_with_transformer_engine_modules_run_under_no_grad():
    frozen = _frozen_output(RoleStack(_Chunk(), [_Chunk(_TELinear(3, 3))]))
    assert not frozen.is_inference() and not frozen.requires_grad
