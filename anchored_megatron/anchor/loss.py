"""The Anchored Learning loss on vocab-parallel logits (Megatron's ``parallel_output=True``).

Public entry point: :func:`vocab_parallel_anchored_loss`. The per-shard arithmetic lives in
``vocab_passes`` and its assembly in ``token_loss``; this module validates the call, finds the
tensor-parallel group and wires the analytic gradient into autograd. ``fused_output`` shares its
validation.
"""

from __future__ import annotations

import numbers

import torch
import torch.distributed as dist

from anchored_megatron.anchor import fused_passes
from anchored_megatron.anchor.token_loss import compute_dtype, token_loss
from anchored_megatron.anchor.vocab_passes import LossSpec, ShardLayout, Workspace

INTERPOLATIONS = ("logit", "prob")
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
METRIC_NAMES = ("kl_step", "kl_bound", "kl_reference", "entropy")

# Auto chunking keeps every [chunk, V_local] temporary near this many elements
# (4 MiB in fp32): small enough that the temporaries stay a few percent of one
# shard, large enough that per-chunk Python overhead stays small.
_AUTO_CHUNK_ELEMENTS = 1 << 20


def _check_unit_interval(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def resolve_group(group):
    """(group, rank, size): the given group, else Megatron's TP group if set up, else one process."""
    if group is None and dist.is_available() and dist.is_initialized():
        from megatron.core import parallel_state

        if parallel_state.model_parallel_is_initialized():
            group = parallel_state.get_tensor_model_parallel_group()
    if group is None:
        return None, 0, 1
    return group, dist.get_rank(group), dist.get_world_size(group)


def build_spec(alpha, interpolation, divergence, jsd_beta, temperature, ce_weight, ignore_index, live_anchor, with_metrics, labels) -> LossSpec:
    alpha = _check_unit_interval("alpha", alpha)
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    jsd_beta = _check_unit_interval("jsd_beta", jsd_beta)
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not float(temperature) > 0.0:
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
    ce_weight = _check_unit_interval("ce_weight", ce_weight)
    if ce_weight > 0.0 and labels is None:
        raise ValueError(f"labels are required when ce_weight > 0, got ce_weight={ce_weight} and labels=None")
    return LossSpec(
        alpha=alpha, interpolation=interpolation, divergence=divergence, jsd_beta=jsd_beta,
        temperature=float(temperature), ce_weight=ce_weight, ignore_index=int(ignore_index),
        live_anchor=live_anchor, with_metrics=with_metrics,
    )


def shard_layout(group, rank: int, size: int, local_vocab: int, vocab_size: int) -> ShardLayout:
    """This rank's place in the padded vocabulary of ``vocab_size`` real tokens."""
    padded_vocab = local_vocab * size
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, numbers.Integral) or not 0 < vocab_size <= padded_vocab:
        raise ValueError(f"vocab_size must be an integer in [1, padded vocabulary {padded_vocab} = {local_vocab} x tp {size}], got {vocab_size!r}")
    vocab_start = rank * local_vocab
    return ShardLayout(group=group, rank=rank, size=size, local_vocab=local_vocab,
                       valid_local=max(0, min(local_vocab, vocab_size - vocab_start)), vocab_start=vocab_start)


def check_chunk_tokens(chunk_tokens) -> None:
    if chunk_tokens is not None and (isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, numbers.Integral) or chunk_tokens < 1):
        raise ValueError(f"chunk_tokens must be an integer >= 1 or None, got {chunk_tokens!r}")


def check_label_range(labels, vocab_size: int, ignore_index: int) -> None:
    # One host sync; pass check_labels=False once the data pipeline guarantees the range.
    bad = ((labels < 0) | (labels >= vocab_size)) & (labels != ignore_index)
    if bool(bad.any()):
        example = labels[bad][0].item()
        raise ValueError(f"labels must be in [0, vocab_size={vocab_size}) or ignore_index={ignore_index}, got {example}")


def _check_tensors(student, reference, anchor, labels) -> None:
    for name, tensor in (("student_logits", student), ("reference_logits", reference), ("anchor_logits", anchor)):
        if tensor is None and name == "anchor_logits":
            continue
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {type(tensor).__name__} "
                             f"{getattr(tensor, 'dtype', '')}")
        if tensor.dim() < 1:
            raise ValueError(f"{name} must have a vocabulary dimension, got shape {tuple(tensor.shape)}")
    for name, tensor in (("reference_logits", reference), ("anchor_logits", anchor)):
        if tensor is not None and tensor.shape != student.shape:
            raise ValueError(f"{name} shape {tuple(tensor.shape)} does not match student_logits shape {tuple(student.shape)}")
    if labels is not None:
        if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.is_complex():
            raise ValueError(f"labels must be an integer tensor, got {getattr(labels, 'dtype', type(labels).__name__)}")
        if labels.shape != student.shape[:-1]:
            raise ValueError(f"labels shape {tuple(labels.shape)} does not match the logits' leading shape {tuple(student.shape[:-1])}")


class _AnchoredLoss(torch.autograd.Function):
    """Per-token loss; the gradient w.r.t. the student logits is computed in forward."""

    @staticmethod
    def forward(ctx, student, reference, anchor, labels, spec: LossSpec, layout: ShardLayout, chunk_tokens: int, fused: bool):
        dtype = compute_dtype(student, reference, anchor)
        leading_shape = student.shape[:-1]
        flat = lambda x: None if x is None else x.reshape(-1, x.shape[-1])  # noqa: E731 - a view for contiguous inputs
        sources = {"student": flat(student), "reference": flat(reference), "anchor": flat(anchor),
                   "labels": None if labels is None else labels.reshape(-1)}
        work = Workspace(min(chunk_tokens, sources["student"].shape[0]), layout.valid_local, dtype, student.device)
        # The gradient buffer doubles as pass A's scratch for one distribution's exp().
        grad = torch.empty(sources["student"].shape, dtype=dtype, device=student.device) if ctx.needs_input_grad[0] else None
        result = token_loss(sources, spec, layout, work, chunk_tokens, fused, grad)
        ctx.grad_buffer = grad
        ctx.student_dtype = student.dtype
        ctx.student_shape = student.shape
        ctx.backward_done = False
        outputs = [result.loss.view(leading_shape)]
        if result.metrics is not None:
            metrics = [m.view(leading_shape) for m in result.metrics]
            ctx.mark_non_differentiable(*metrics)
            outputs += metrics
        return tuple(outputs)

    @staticmethod
    def backward(ctx, grad_loss, *unused_metric_grads):
        if ctx.backward_done:
            raise RuntimeError("vocab_parallel_anchored_loss: backward ran twice on one call (retain_graph is not supported)")
        ctx.backward_done = True
        grad = ctx.grad_buffer
        ctx.grad_buffer = None
        if grad is None:
            return (None,) * 8
        # In place: the buffer is ours and used once; no second shard-sized tensor.
        grad.mul_(grad_loss.reshape(-1, 1).to(grad.dtype))
        return grad.view(ctx.student_shape).to(ctx.student_dtype), None, None, None, None, None, None, None


def vocab_parallel_anchored_loss(
    student_logits: torch.Tensor,
    reference_logits: torch.Tensor,
    anchor_logits: torch.Tensor | None = None,
    *,
    alpha: float,
    interpolation: str = "logit",
    divergence: str = "forward_kl",
    jsd_beta: float = 0.5,
    temperature: float = 1.0,
    labels: torch.Tensor | None = None,
    ce_weight: float = 0.0,
    ignore_index: int = -100,
    vocab_size: int | None = None,
    group=None,
    return_metrics: bool = False,
    chunk_tokens: int | None = None,
    check_labels: bool = True,
):
    """Per-token Anchored Learning loss on vocabulary-sharded logits (Megatron's ``parallel_output=True``).

    A collective over the tensor-parallel group: every rank of the group calls it, in the same
    order, with its own shard of the vocabulary (rank r holds columns [r V_local, (r+1) V_local)).
    ``group=None`` uses Megatron's tensor-model-parallel group when ``megatron.core.parallel_state``
    is initialised, else this process alone (the logits then hold the whole vocabulary); pass a
    ``torch.distributed`` process group to shard over other ranks.

    loss = (1 - ce_weight) tau^2 D(q, p_theta) + ce_weight CE(labels), CE at tau = 1, with
    p_theta = softmax(z_theta / tau) and the anchor q built from the snapshot z_s and the reference z_r:
    "logit": q = softmax(((1 - alpha) z_s + alpha z_r) / tau); "prob": q = (1 - alpha) p_s + alpha p_r.

    Args:
        student_logits: ``[..., V_local]`` floating point (any leading shape, e.g. ``[s, b]``);
            the only input that gets a gradient (in its own dtype; one backward per call).
        reference_logits: the frozen reference z_r, same shape; never receives a gradient.
        anchor_logits: the snapshot z_s, same shape, or None for the live student (detached).
        alpha: anchor strength in [0, 1]; 1 is distillation toward the reference.
        interpolation: "logit" or "prob", how q mixes snapshot and reference (above).
        divergence: "forward_kl" KL(q || p_theta), "reverse_kl" KL(p_theta || q), or "jsd"
            beta KL(q || m) + (1 - beta) KL(p_theta || m) with m = beta q + (1 - beta) p_theta.
        jsd_beta: beta of "jsd", in [0, 1].
        temperature: tau > 0, applied to every distribution of the divergence term.
        labels: integer targets ``[...]`` (the logits' leading shape); required when ce_weight > 0.
        ce_weight: weight in [0, 1] of the cross-entropy term.
        ignore_index: the label of tokens without a CE term.
        vocab_size: the real vocabulary; padded columns at or beyond it are left out of every
            softmax (default: V_local x the group size, i.e. no padding).
        group: the process group the vocabulary is sharded over (above).
        return_metrics: also return the per-token metrics.
        chunk_tokens: tokens per pass over the shard, bounding the ``[chunk, V_local]``
            temporaries (None: about 1M elements each).
        check_labels: check that labels lie in [0, vocab_size) or equal ignore_index (one host
            sync); pass False when the data pipeline guarantees it.

    Returns:
        The per-token loss, shape ``[...]`` (no reduction), float64 if any logits are float64,
        else float32. With ``return_metrics``: ``(loss, metrics)``, metrics a dict of per-token
        tensors without grad, all at temperature tau: ``kl_step`` = KL(q || p_s), ``kl_bound`` =
        alpha (KL(p_r || p_s) + KL(p_s || p_r)) ("logit") or alpha KL(p_r || p_s) ("prob"), so that
        kl_step <= kl_bound; ``kl_reference`` = KL(p_r || p_theta); ``entropy`` = H(p_theta).
    """
    _check_tensors(student_logits, reference_logits, anchor_logits, labels)
    spec = build_spec(alpha, interpolation, divergence, jsd_beta, temperature, ce_weight, ignore_index,
                      anchor_logits is None, bool(return_metrics), labels)
    group, rank, size = resolve_group(group)
    local_vocab = student_logits.shape[-1]
    vocab_size = local_vocab * size if vocab_size is None else vocab_size
    layout = shard_layout(group, rank, size, local_vocab, vocab_size)
    check_chunk_tokens(chunk_tokens)
    if labels is not None and check_labels:
        check_label_range(labels, vocab_size, spec.ignore_index)
    fused = fused_passes.applies(spec, layout)
    if chunk_tokens is None:
        elements = fused_passes.CHUNK_ELEMENTS if fused else _AUTO_CHUNK_ELEMENTS
        chunk_tokens = max(1, elements // max(1, local_vocab))

    # The live anchor is the student's value without its graph; reference and anchor are
    # detached so that no gradient can reach them whatever the caller passed.
    outputs = _AnchoredLoss.apply(
        student_logits, reference_logits.detach(), None if anchor_logits is None else anchor_logits.detach(),
        None if labels is None else labels.detach().long(), spec, layout, int(chunk_tokens), fused,
    )
    if not return_metrics:
        return outputs[0]
    return outputs[0], dict(zip(METRIC_NAMES, outputs[1:]))
