"""Anchored Learning inside an existing Megatron-LM (``pretrain_gpt.py``-style) pipeline.

Three pieces replace their Megatron-LM counterparts; everything else (data, DDP, the
distributed optimizer, checkpoints, logging) stays the user's::

    anchored = AnchoredLearning(AnchorConfig(alpha=0.5), vocab_size=128256,
                                reference="/ckpt/llama3-8b-sft", steps_per_iteration=500,
                                current_step=lambda: get_args().curr_iteration)
    pretrain(..., anchored.model_provider(model_provider), ModelType.encoder_or_decoder,
             anchored.forward_step, ...)
    # in train_step: forward_backward_func(..., adjust_tensor_shapes_fn=anchored.adjust_tensor_shapes_fn())

- ``model_provider(student_provider)``: calls the user's provider once for the student and
  once per frozen role (reference, snapshot), so every role is co-sharded with the student
  (same TP/PP layout, same layers on a stage), and returns a ``RoleStack`` that Megatron-LM
  wraps in Float16Module / DDP as if it were the GPT model. DDP, the optimizer and the
  checkpoint see only the student.
- ``forward_step(data_iterator, model) -> (output, loss_func)`` with
  ``loss_func(output) -> (loss_sum, num_tokens, {"lm loss": [sum, n], "kl_step": [sum, n], ...})``:
  Megatron-LM's reporting convention (each value a [sum, count] pair it all-reduces over DP).
- ``adjust_tensor_shapes_fn()``: widens the 1F1B schedule's P2P shapes so every role's
  hidden state travels in one tensor (None when PP = 1 or there is no frozen role).

``fused_output_loss`` (default on, as ``model.fused_output_loss``): the roles' GPT models return
their final hidden states and the loss applies the output weights one token chunk at a time,
so no role's vocabulary logits are ever held whole (``anchor/fused_output.py``); sequence
parallelism and any pipeline layout are handled.

Snapshot refresh: at the first forward of each outer iteration (from ``current_step`` and
``steps_per_iteration``; else call ``begin_iteration`` yourself) the snapshot takes the
student's weights. Megatron-LM checkpoints hold only the student: a run resumed in the middle
of an outer iteration re-anchors at the resumed student (the trainer in
``anchored_megatron.training`` saves the snapshot and has no such gap).
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch

from anchored_megatron.config import AnchorConfig, ConfigError
from anchored_megatron.training.forward_step import masked_loss
from anchored_megatron.training.objectives import IterationLoss, iteration_loss
from anchored_megatron.training.roles import FusedOutput, OutputFusion, RoleStack, adjust_tensor_shapes_for, copy_weights, freeze

# Keys of the loss dict, in SUM_NAMES order (the token count is the shared denominator).
REPORTED_NAMES = ("lm loss", "kl_step", "kl_bound", "kl_reference", "entropy")

BATCH_TUPLE = ("tokens", "labels", "loss_mask", "attention_mask", "position_ids")


class AnchoredRoleStack(RoleStack):
    """A ``RoleStack`` that behaves like the student toward Megatron-LM's model handling:
    device / dtype moves (``.cuda()``, ``Float16Module``'s ``.bfloat16()``) reach the frozen
    roles too, and ``state_dict`` / ``load_state_dict`` are the student's own (no ``module.``
    prefix, frozen roles out of checkpoints)."""

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for role in self.frozen:
            role._apply(fn, recurse)
        return self

    def state_dict(self, *args, **kwargs):
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, *args, **kwargs):
        return self.module.load_state_dict(state_dict, strict, *args, **kwargs)


def find_role_stack(model) -> RoleStack:
    """The RoleStack inside Megatron's wrappers (DDP, Float16Module)."""
    module = model
    while not isinstance(module, RoleStack):
        if not hasattr(module, "module"):
            raise TypeError(f"{type(model).__name__} holds no RoleStack: build the model with AnchoredLearning.model_provider")
        module = module.module
    return module


def default_get_batch(data_iterator):
    """``next(data_iterator)``: a dict with tokens, labels, loss_mask, position_ids and
    attention_mask, or Megatron-LM's ``get_batch`` tuple (tokens, labels, loss_mask,
    attention_mask, position_ids). Stages that do not need a field may hold None there
    (Megatron-LM's middle pipeline stages get all None)."""
    return next(data_iterator)


def as_batch_dict(batch) -> dict:
    if isinstance(batch, (tuple, list)):
        return dict(zip(BATCH_TUPLE, batch))
    return batch


def reported_losses(sums: torch.Tensor) -> dict[str, torch.Tensor]:
    """Megatron-LM's per-microbatch report: {name: [sum, tokens]} (it sums over microbatches,
    all-reduces over DP and divides)."""
    tokens = sums[-1:]
    return {name: torch.cat([sums[i : i + 1], tokens]) for i, name in enumerate(REPORTED_NAMES)}


def anchored_loss_func(batch: dict, frozen_outputs: list, terms: IterationLoss, vocab_size: int, output_tensor, fused: FusedOutput | None = None):
    """(loss_sum, num_tokens, {"lm loss": [sum, n], "kl_step": [sum, n], ...}) of one microbatch.
    The outputs are logits, or final hidden states with ``fused`` (``RoleStack.fused_output``)."""
    missing = [key for key in ("labels", "loss_mask") if batch.get(key) is None]
    if missing:
        raise KeyError(f"the last pipeline stage's batch lacks {', '.join(missing)} (keys given: {', '.join(k for k, v in batch.items() if v is not None)})")
    loss_sum, sums = masked_loss(output_tensor, frozen_outputs, batch, terms, vocab_size, fused)
    num_tokens = batch["loss_mask"].sum().to(torch.int)
    return loss_sum, num_tokens, reported_losses(sums)


class AnchoredLearning:
    """Anchored Learning (or a baseline objective of ``AnchorConfig``) for a Megatron-LM loop.

    Args:
        anchor: the objective and its settings (validated here; ConfigError names the option).
        vocab_size: the tokenizer's real vocabulary; padded logit columns beyond it are masked.
        reference: where the frozen reference's weights come from, for objectives that use one:
            a checkpoint directory (``anchored-convert`` output or a trainer checkpoint, read
            with ``checkpoint.weights.load_megatron_weights``) or ``fn(reference_chunk)`` that loads them
            into the chunk built for this rank. None leaves the reference as built (randomly
            initialised: for tests).
        base: with ``anchor.base_kl_weight`` > 0, where the frozen base's weights come from (as
            ``reference``; required then: the base is the checkpoint the student starts from).
        steps_per_iteration: optimizer steps per outer iteration; with ``current_step`` it
            decides when the snapshot is refreshed and the alpha schedule advances. Give both
            or neither (then call ``begin_iteration`` yourself).
        current_step: returns the completed optimizer steps, e.g.
            ``lambda: get_args().curr_iteration``.
        get_batch: ``get_batch(data_iterator)`` returns a microbatch, as a dict or Megatron-LM's
            ``get_batch`` tuple (see ``default_get_batch``).
        fused_output_loss: as ``model.fused_output_loss``: the last stage's models return final
            hidden states and the loss makes the logits one token chunk at a time.
        fused_output_chunk_tokens: as ``model.fused_output_chunk_tokens`` (None: from the
            memory budget).
    """

    def __init__(
        self,
        anchor: AnchorConfig,
        vocab_size: int,
        reference: str | Callable | None = None,
        base: str | Callable | None = None,
        steps_per_iteration: int | None = None,
        current_step: Callable[[], int] | None = None,
        get_batch: Callable = default_get_batch,
        fused_output_loss: bool = True,
        fused_output_chunk_tokens: int | None = None,
    ):
        anchor.validate()
        if not isinstance(fused_output_loss, bool):
            raise ConfigError(f"fused_output_loss: must be True or False, got {fused_output_loss!r}")
        chunk = fused_output_chunk_tokens
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
            raise ConfigError(f"fused_output_chunk_tokens: must be an integer >= 1 or None, got {chunk!r}")
        if chunk is not None and not fused_output_loss:
            raise ConfigError("fused_output_chunk_tokens: is used only with fused_output_loss=True")
        if not isinstance(vocab_size, int) or vocab_size < 1:
            raise ConfigError(f"vocab_size: must be a positive integer, got {vocab_size!r}")
        if (steps_per_iteration is None) != (current_step is None):
            raise ConfigError("steps_per_iteration: give it together with current_step (or neither, and call begin_iteration)")
        if steps_per_iteration is not None and (not isinstance(steps_per_iteration, int) or steps_per_iteration < 1):
            raise ConfigError(f"steps_per_iteration: must be an integer >= 1, got {steps_per_iteration!r}")
        if anchor.needs_base and base is None:
            raise ConfigError("base: is required with anchor.base_kl_weight > 0 (the checkpoint the student starts from, or fn(chunk))")
        if base is not None and not anchor.needs_base:
            raise ConfigError("base: is used only with anchor.base_kl_weight > 0 and anchor.objective=anchored; remove it")
        if anchor.objective == "taid" and current_step is None:
            raise ConfigError("current_step: is required with anchor.objective=taid (its t follows the optimizer step)")
        self.anchor = anchor
        self.vocab_size = vocab_size
        self.reference = reference
        self.base = base
        self.steps_per_iteration = steps_per_iteration
        self.current_step = current_step
        self.get_batch = get_batch
        self.fusion = OutputFusion(chunk_tokens=chunk) if fused_output_loss else None
        self.stacks: list[AnchoredRoleStack] = []
        self.iteration: int | None = None
        self.iteration_loss: IterationLoss = iteration_loss(anchor, 0)

    @property
    def frozen_roles(self) -> tuple[str, ...]:
        return self.anchor.frozen_roles

    @property
    def num_roles(self) -> int:
        return 1 + len(self.frozen_roles)

    # ---- model -----------------------------------------------------------------------------
    def model_provider(self, student_provider: Callable) -> Callable:
        """Wrap the user's ``model_provider(pre_process, post_process, ...)``: the returned
        provider takes the same arguments and returns the student with its frozen roles."""

        def provider(*args, **kwargs):
            student = student_provider(*args, **kwargs)  # first: the student's init is unchanged
            if self.frozen_roles and kwargs.get("vp_stage") is not None:
                raise ConfigError(
                    "parallel.vpp: the interleaved schedule cannot carry the frozen roles' hidden states "
                    "(Megatron-Core ignores adjust_tensor_shapes_fn there); use the 1F1B schedule"
                )
            roles = {name: student_provider(*args, **kwargs) for name in self.frozen_roles}
            for role in roles.values():
                freeze([role])
            if "reference" in roles and self.reference is not None:
                self._load_weights(roles["reference"], self.reference)
            if "base" in roles:
                self._load_weights(roles["base"], self.base)
            stack = AnchoredRoleStack(student, list(roles.values()), self.fusion)
            self.stacks.append(stack)
            return stack

        return provider

    @staticmethod
    def _load_weights(chunk, source) -> None:
        if callable(source):
            source(chunk)
            return
        from anchored_megatron.checkpoint.weights import load_megatron_weights

        load_megatron_weights([chunk], source)

    def adjust_tensor_shapes_fn(self):
        """For ``forward_backward_func(..., adjust_tensor_shapes_fn=...)``; None when not pipelined."""
        from megatron.core import parallel_state

        if parallel_state.get_pipeline_model_parallel_world_size() == 1 or self.num_roles == 1:
            return None
        return adjust_tensor_shapes_for(self.num_roles)

    # ---- outer iterations ------------------------------------------------------------------
    def begin_iteration(self, iteration: int) -> None:
        """Start outer iteration ``iteration``: the snapshot takes the student's weights and the
        loss takes the iteration's settings (alpha schedule). Call between optimizer steps."""
        if self.anchor.needs_snapshot:
            for stack in self.stacks:
                copy_weights([stack.module], [stack.frozen[self.frozen_roles.index("snapshot")]])
        self.iteration_loss = iteration_loss(self.anchor, iteration)
        self.iteration = iteration

    def _sync_iteration(self) -> None:
        if self.current_step is not None:
            iteration = min(self.current_step() // self.steps_per_iteration, self.anchor.outer_iterations - 1)
        else:
            iteration = self.iteration if self.iteration is not None else 0
        if iteration != self.iteration:
            self.begin_iteration(iteration)
        if self.anchor.objective == "taid":
            total_steps = self.steps_per_iteration * self.anchor.outer_iterations
            self.iteration_loss = iteration_loss(self.anchor, iteration, self.current_step(), total_steps)

    # ---- the step --------------------------------------------------------------------------
    def forward_step(self, data_iterator, model):
        """Megatron's ``forward_step_func``: run every role on the microbatch, return the
        student's output and the anchored loss function."""
        self._sync_iteration()
        batch = as_batch_dict(self.get_batch(data_iterator))
        output = model(batch.get("tokens"), batch.get("position_ids"), batch.get("attention_mask"))
        stack = find_role_stack(model)
        frozen = stack.take_frozen_outputs()
        return output, partial(anchored_loss_func, batch, frozen, self.iteration_loss, self.vocab_size, fused=stack.fused_output())


__all__ = ["AnchoredLearning", "AnchoredRoleStack", "REPORTED_NAMES", "anchored_loss_func", "as_batch_dict", "default_get_batch", "find_role_stack"]
