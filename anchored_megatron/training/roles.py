"""The three co-sharded roles and the wrapper that runs them in lock-step through the pipeline.

- student: trainable, wrapped in Megatron DDP.
- reference: the frozen teacher (for ``sft_kl``: the base), loaded from its own checkpoint.
- snapshot: a frozen copy of the student, refreshed in place at outer-iteration boundaries.

Every role is built with the same TP/PP layout, so on a pipeline stage all roles hold the
same layers. ``RoleStack`` is what Megatron's schedule sees as "the model": its forward runs
the student with autograd and the frozen roles without (``frozen_grad_mode``); between stages the
roles' hidden states travel concatenated along the hidden dimension in ONE P2P tensor
(``adjust_tensor_shapes`` widens the schedule's shapes to match). With ``train.frozen_hidden_cache``
a frozen role whose outputs for the microbatch are cached does not run (``frozen_cache.py``).

With the fused output loss (``model.fused_output_loss``) every role's last stage returns its final
hidden states instead of vocabulary logits; the loss applies the output weights chunk by chunk
(``anchor/fused_output.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from anchored_megatron.config import ModelConfig
from anchored_megatron.models.hidden_output import output_weight, return_hidden_states
from anchored_megatron.models.layout import unwrap


@dataclass(frozen=True)
class OutputFusion:
    """Settings of the fused output-layer loss."""

    chunk_tokens: int | None = None  # tokens per chunk; None: from the memory budget


def output_fusion(model: ModelConfig) -> OutputFusion | None:
    return OutputFusion(chunk_tokens=model.fused_output_chunk_tokens) if model.fused_output_loss else None


@dataclass(frozen=True)
class FusedOutput:
    """What the fused loss needs besides the hidden states, for one forward on the last stage."""

    weights: tuple  # the output weight of the student, then of each frozen role
    chunk_tokens: int | None
    sequence_parallel: bool


def freeze(chunks) -> None:
    for chunk in chunks:
        chunk.eval()
        for param in chunk.parameters():
            param.requires_grad_(False)


@torch.no_grad()
def copy_weights(source_chunks, target_chunks) -> None:
    """In-place copy between identically laid-out chunks (no rebuild, no deepcopy)."""
    for source, target in zip(source_chunks, target_chunks, strict=True):
        src = dict(unwrap(source).named_parameters())
        for name, param in unwrap(target).named_parameters():
            param.copy_(src[name])


def _uses_transformer_engine(roles: list) -> bool:
    return any(type(m).__module__.startswith("transformer_engine") for role in roles for m in role.modules())


class RoleStack(torch.nn.Module):
    """One pipeline chunk of the student plus the same chunk of each frozen role.

    Attribute lookups that Megatron makes through ``.module`` (config, set_input_tensor of
    wrapped models, post_process, ...) fall through to the student; the frozen chunks are
    held in a plain list so DDP, the optimizer and checkpoints never see them.
    """

    def __init__(self, student, frozen: list, fusion: OutputFusion | None = None, cache=None):
        super().__init__()
        self.module = student
        self.frozen = list(frozen)
        self.config = unwrap(student).config
        self.frozen_outputs: list[torch.Tensor] = []
        # inference_mode, not no_grad: the frozen outputs never enter autograd's saved tensors
        # (the losses keep what backward needs themselves), and skipping version counting and
        # view tracking made each frozen forward 0.87-0.90x as long on CPU (two interleaved pairs
        # of runs at step_bench's model). Roles with Transformer Engine modules keep no_grad: TE's
        # cached FP8 weights under inference_mode are untested here (no GPU).
        self.frozen_grad_mode = torch.no_grad if _uses_transformer_engine(self.frozen) else torch.inference_mode
        self.fusion = fusion if self.is_last_stage else None
        self.cache = cache  # a FrozenHiddenCache (train.frozen_hidden_cache), else None
        self.next_plan = None  # the FrozenPlan of the next forward, set by the forward step
        if self.fusion is not None:
            for role in (student, *self.frozen):
                return_hidden_states(unwrap(role))

    def __getattr__(self, name):
        # DDP's grad-sync hooks (finish_grad_sync, no_sync, ...) are the student's.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("module"), name)

    def set_is_first_microbatch(self) -> None:
        """Each step's first microbatch: TE linears re-quantize their cached FP8 weights. The
        frozen roles too: the snapshot's weights change in place at iteration boundaries."""
        for module in (self.module, *self.frozen):
            target = module if hasattr(module, "set_is_first_microbatch") else unwrap(module)
            target.set_is_first_microbatch()

    @property
    def is_last_stage(self) -> bool:
        return unwrap(self.module).post_process

    def set_input_tensor(self, input_tensor) -> None:
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        student = unwrap(self.module)
        if input_tensor is None or not self.frozen:
            student.set_input_tensor(input_tensor)
            for role in self.frozen:
                unwrap(role).set_input_tensor(input_tensor)
            return
        parts = torch.chunk(input_tensor, 1 + len(self.frozen), dim=-1)
        student.set_input_tensor(parts[0])
        for role, part in zip(self.frozen, parts[1:]):
            unwrap(role).set_input_tensor(part.detach())

    def forward(self, *args, **kwargs):
        output = self.module(*args, **kwargs)
        plan, self.next_plan = self.next_plan, None
        with self.frozen_grad_mode():
            frozen_outputs = [None if plan is not None and plan.cached[i] else role(*args, **kwargs) for i, role in enumerate(self.frozen)]
        if plan is not None:
            frozen_outputs = self.cache.exchange(plan, frozen_outputs, output)
        if self.is_last_stage:
            self.frozen_outputs = frozen_outputs
            return output
        return torch.cat([output, *frozen_outputs], dim=-1) if frozen_outputs else output

    def take_frozen_outputs(self) -> list[torch.Tensor]:
        """The frozen roles' logits (hidden states when fused) of the last forward (last stage
        only), handed over once."""
        outputs, self.frozen_outputs = self.frozen_outputs, []
        return outputs

    def fused_output(self) -> FusedOutput | None:
        """On the last stage of a fused stack: the roles' output weights (the student's is its
        trainable parameter) and the loss settings; else None (the outputs are logits)."""
        if self.fusion is None:
            return None
        weights = tuple(output_weight(unwrap(role)) for role in (self.module, *self.frozen))
        return FusedOutput(weights=weights, chunk_tokens=self.fusion.chunk_tokens, sequence_parallel=bool(self.config.sequence_parallel))


def adjust_tensor_shapes_for(num_roles: int):
    """For Megatron's 1F1B schedule: P2P tensors carry every role's hidden state."""

    def adjust(recv_tensor_shapes, send_tensor_shapes):
        widen = lambda shapes: [(*shape[:-1], shape[-1] * num_roles) for shape in shapes]  # noqa: E731
        return widen(recv_tensor_shapes), widen(send_tensor_shapes)

    return adjust
