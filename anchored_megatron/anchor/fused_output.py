"""The output layer fused with the anchored loss: no role's vocabulary logits ever exist whole.

Inputs are each role's final hidden states and (vocab-sharded) output weight. Token chunk by
token chunk, each role's logits shard is made by one GEMM (the student's, the reference's and
the snapshot's alike), consumed by ``token_loss`` (the passes and packed all-reduces of
``vocab_parallel_anchored_loss``) and dropped. The loss is a weighted sum over tokens whose
weights are known up front (loss mask x scale), so ``token_loss``'s d loss_t / d logits gives
the whole gradient in forward:

    G = weight_t * d loss_t / d z_t      [chunk, V_local], never kept
    d hidden_t = G_t W                   summed over the tensor-parallel group (the column-parallel
                                         output layer's input gradient)
    d W       += G^T hidden              this rank's vocabulary rows

and backward only scales both by the incoming scalar (the pipeline's loss scale or 1 / number of
microbatches). Given ``token_rows`` (the tokens with a nonzero loss mask, known to the data pipeline
on the host), only those rows are computed: prompt and padding tokens, often half of an SFT batch,
then cost neither output-layer GEMMs nor vocabulary passes, and their hidden-state gradient is zero.
The weight gradient goes back through autograd, so Megatron's DDP hook adds it into ``main_grad`` as
it would the output layer's own (accumulation across microbatches and the tied-embedding sum
included). It is accumulated over chunks in fp32 and handed over in the weight's dtype, like the
unfused layer's.

Sequence parallelism: the hidden states arrive split along the sequence ([b, s / tp, h]); they are
gathered first and their gradient is reduce-scattered back.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch
import torch.distributed as dist

from anchored_megatron.anchor import chunks, fused_passes
from anchored_megatron.anchor.loss import (
    METRIC_NAMES, build_spec, check_chunk_tokens, check_label_range, resolve_group, shard_layout,
)
from anchored_megatron.anchor.token_loss import compute_dtype, eager_scratch_buffers, token_loss
from anchored_megatron.anchor.vocab_passes import LossSpec, ShardLayout, Workspace, chunk_rows


@dataclass(frozen=True)
class _Call:
    spec: LossSpec
    layout: ShardLayout
    loss_scale: float
    chunk_tokens: int
    fused: bool
    sequence_parallel: bool
    label_prob_weight: bool


def _gather_sequence(hidden: torch.Tensor, layout: ShardLayout) -> torch.Tensor:
    """[b, s / tp, h] on each rank -> [b, s, h], ranks in sequence order."""
    parts = [torch.empty_like(hidden) for _ in range(layout.size)]
    dist.all_gather(parts, hidden.contiguous(), group=layout.group)
    return torch.cat(parts, dim=1)


def _reduce_scatter_sequence(grad: torch.Tensor, layout: ShardLayout) -> torch.Tensor:
    """[b, s, h] partial sums -> this rank's [b, s / tp, h] of the sum over the group."""
    batch, seq, hidden = grad.shape
    local = seq // layout.size
    by_rank = grad.view(batch, layout.size, local, hidden).transpose(0, 1).contiguous()
    out = torch.empty(batch, local, hidden, dtype=grad.dtype, device=grad.device)
    # The list form: the flat-tensor one is deprecated from torch 2.13 and its successor is new.
    dist.reduce_scatter(out, list(by_rank.unbind(0)), group=layout.group)
    return out


def _token_rows(hidden: torch.Tensor | None, call: _Call):
    """[tokens, h], the sequence gathered (each chunk is cast to the weights' dtype when used:
    ``Float16Module`` hands over fp32 hidden states, a whole cast copy would be one more)."""
    if hidden is None:
        return None
    if call.sequence_parallel and call.layout.size > 1:
        hidden = _gather_sequence(hidden, call.layout)
    return hidden.reshape(-1, hidden.shape[-1])


def _add_weight_grad(grad_weight: torch.Tensor, scaled: torch.Tensor, rows: torch.Tensor, first: bool) -> None:
    """grad_weight += scaled^T rows (``first``: grad_weight = ..., its contents unset): one GEMM
    when the dtypes agree, else per block of vocabulary rows in the GEMM dtype (a bounded
    temporary) summed in the accumulator's."""
    if scaled.dtype == grad_weight.dtype:
        if first:  # written, not accumulated: no zero-fill of the [V, h] accumulator first
            torch.mm(scaled.t(), rows, out=grad_weight)
        else:
            grad_weight.addmm_(scaled.t(), rows)
        return
    if first:
        grad_weight.zero_()
    block = chunks.weight_grad_block_rows(rows.shape[1], rows.element_size())
    for start in range(0, grad_weight.shape[0], block):
        stop = min(start + block, grad_weight.shape[0])
        grad_weight[start:stop].add_(torch.mm(scaled[:, start:stop].t(), rows))


class _FusedOutputLoss(torch.autograd.Function):
    """loss_sum (and metric sums); the gradients w.r.t. the student's hidden states and output
    weight are computed in forward."""

    @staticmethod
    def forward(ctx, student_hidden, student_weight, reference_hidden, reference_weight, anchor_hidden, anchor_weight,
                labels, loss_mask, token_rows, call: _Call):
        spec, layout = call.spec, call.layout
        valid = layout.valid_local
        hidden = _token_rows(student_hidden, call)
        frozen = {"reference": (_token_rows(reference_hidden, call), reference_weight),
                  "anchor": (_token_rows(anchor_hidden, call), anchor_weight)}
        all_tokens = hidden.shape[0]
        mask = loss_mask.reshape(-1)
        flat_labels = None if labels is None else labels.reshape(-1)
        if token_rows is not None:
            select = lambda rows: None if rows is None else rows.index_select(0, token_rows)  # noqa: E731
            hidden, mask, flat_labels = select(hidden), select(mask), select(flat_labels)
            frozen = {name: (select(rows), role_weight) for name, (rows, role_weight) in frozen.items()}
        num_tokens, device = hidden.shape[0], hidden.device
        dtype = compute_dtype(student_weight, reference_weight, anchor_weight)
        chunk = max(1, min(call.chunk_tokens, num_tokens))
        want_hidden_grad, want_weight_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]

        weight = student_weight[:valid]  # padded vocabulary rows: no logits, zero gradient
        work = Workspace(chunk, valid, dtype, device)
        logits = {"student": torch.empty(chunk, valid, dtype=weight.dtype, device=device)}
        for name, (rows, role_weight) in frozen.items():
            if rows is not None:
                logits[name] = torch.empty(chunk, valid, dtype=role_weight.dtype, device=device)
        grad = torch.empty(chunk, valid, dtype=dtype, device=device) if want_hidden_grad or want_weight_grad else None
        # d loss / d logits in the weights' dtype for the GEMMs, as the unfused layer's backward sees it.
        cast = torch.empty(chunk, valid, dtype=weight.dtype, device=device) if grad is not None and weight.dtype != dtype else None
        grad_hidden = torch.empty(num_tokens, hidden.shape[1], dtype=weight.dtype, device=device) if want_hidden_grad else None
        grad_weight = torch.empty(student_weight.shape, dtype=dtype, device=device) if want_weight_grad else None
        if grad_weight is not None:
            grad_weight[valid:].zero_()  # padded vocabulary rows; the others are written by the first chunk

        mask = mask.to(dtype)
        token_weight = mask * call.loss_scale
        loss_sum = torch.zeros((), dtype=dtype, device=device)
        metric_sums = torch.zeros(len(METRIC_NAMES), dtype=dtype, device=device) if spec.with_metrics else None
        fused = call.fused
        for rows in chunk_rows(num_tokens, chunk):
            n = rows.stop - rows.start
            chunk_hidden = hidden[rows].to(weight.dtype)
            sources = {"student": torch.mm(chunk_hidden, weight.t(), out=logits["student"][:n]),
                       "labels": None if flat_labels is None else flat_labels[rows]}
            for name, (role_rows, role_weight) in frozen.items():
                if role_rows is not None:
                    sources[name] = torch.mm(role_rows[rows].to(role_weight.dtype), role_weight[:valid].t(), out=logits[name][:n])
            # Without a reference (sft, ce_weight = 1) nothing reads it: the student stands in.
            sources.setdefault("reference", sources["student"])
            sources.setdefault("anchor", None)
            chunk_grad = None if grad is None else grad[:n]
            result = token_loss(sources, spec, layout, work, n, fused, chunk_grad)
            fused = result.fused
            chunk_weight = token_weight[rows]
            if call.label_prob_weight:  # the loss is the CE here: exp(-loss) is p_theta(label), held constant
                chunk_weight = chunk_weight * torch.exp(-result.loss)
            loss_sum += torch.dot(result.loss, chunk_weight)
            if metric_sums is not None:
                metric_sums += torch.stack(result.metrics) @ mask[rows]
            if chunk_grad is None:
                continue
            row_weight = chunk_weight.unsqueeze(-1)
            scaled = chunk_grad.mul_(row_weight) if cast is None else torch.mul(chunk_grad, row_weight, out=cast[:n])
            if grad_hidden is not None:
                torch.mm(scaled, weight, out=grad_hidden[rows])
            if grad_weight is not None:
                _add_weight_grad(grad_weight[:valid], scaled, chunk_hidden, first=rows.start == 0)

        if grad_weight is not None and num_tokens == 0:
            grad_weight.zero_()  # no chunk ran
        ctx.call = call
        ctx.token_rows = token_rows
        ctx.all_tokens = all_tokens
        ctx.grad_hidden = grad_hidden
        ctx.grad_weight = grad_weight
        ctx.hidden_shape = student_hidden.shape
        ctx.hidden_dtype = student_hidden.dtype
        ctx.weight_dtype = student_weight.dtype
        ctx.backward_done = False
        if metric_sums is None:
            return loss_sum
        ctx.mark_non_differentiable(metric_sums)
        return loss_sum, metric_sums

    @staticmethod
    def backward(ctx, grad_loss, *unused_metric_grads):
        if ctx.backward_done:
            raise RuntimeError("fused_output_anchored_loss: backward ran twice on one call (retain_graph is not supported)")
        ctx.backward_done = True
        call, layout = ctx.call, ctx.call.layout
        grad_hidden = grad_weight = None
        if ctx.grad_hidden is not None:
            partial = ctx.grad_hidden.mul_(grad_loss.to(ctx.grad_hidden.dtype))
            if ctx.token_rows is not None:  # the rows left out have no loss: zero gradient
                partial = partial.new_zeros(ctx.all_tokens, partial.shape[1]).index_copy_(0, ctx.token_rows, partial)
            if call.sequence_parallel and layout.size > 1:
                batch, local, hidden = ctx.hidden_shape[-3:]
                grad_hidden = _reduce_scatter_sequence(partial.view(batch, local * layout.size, hidden), layout)
            else:
                if layout.size > 1:
                    dist.all_reduce(partial, group=layout.group)
                grad_hidden = partial
            grad_hidden = grad_hidden.view(ctx.hidden_shape).to(ctx.hidden_dtype)
        if ctx.grad_weight is not None:
            grad_weight = ctx.grad_weight.mul_(grad_loss.to(ctx.grad_weight.dtype)).to(ctx.weight_dtype)
        ctx.grad_hidden = ctx.grad_weight = ctx.token_rows = None
        return grad_hidden, grad_weight, None, None, None, None, None, None, None, None


def _check_role(name: str, hidden, weight, student_hidden, student_weight) -> None:
    if (hidden is None) != (weight is None):
        raise ValueError(f"{name}_hidden and {name}_weight go together, got only {name}_{'weight' if hidden is None else 'hidden'}")
    if hidden is None:
        return
    for what, tensor in ((f"{name}_hidden", hidden), (f"{name}_weight", weight)):
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise ValueError(f"{what} must be a floating-point tensor, got {type(tensor).__name__} {getattr(tensor, 'dtype', '')}")
    if weight.dim() != 2:
        raise ValueError(f"{name}_weight must be [V_local, hidden], got shape {tuple(weight.shape)}")
    if student_hidden is not None and hidden.shape != student_hidden.shape:
        raise ValueError(f"{name}_hidden shape {tuple(hidden.shape)} does not match student_hidden shape {tuple(student_hidden.shape)}")
    if student_weight is not None and weight.shape != student_weight.shape:
        raise ValueError(f"{name}_weight shape {tuple(weight.shape)} does not match student_weight shape {tuple(student_weight.shape)}")
    if hidden.dim() < 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{name}_hidden shape {tuple(hidden.shape)} does not end in the weight's hidden size {weight.shape[1]}")


def _check_token_rows(token_rows, tokens: tuple, device) -> None:
    # Their range is index_select's to check: here it would sync the host with the device.
    count = 1
    for size in tokens:
        count *= size
    if not isinstance(token_rows, torch.Tensor) or token_rows.dtype != torch.long or token_rows.dim() != 1:
        raise ValueError(f"token_rows must be a 1-D int64 tensor of token indices, got "
                         f"{getattr(token_rows, 'dtype', type(token_rows).__name__)} {tuple(getattr(token_rows, 'shape', ()))}")
    if token_rows.numel() > count:
        raise ValueError(f"token_rows has {token_rows.numel()} indices for {count} tokens")
    if token_rows.device != device:
        raise ValueError(f"token_rows is on {token_rows.device}, the hidden states on {device}")


def fused_output_anchored_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    reference_hidden: torch.Tensor | None = None,
    reference_weight: torch.Tensor | None = None,
    anchor_hidden: torch.Tensor | None = None,
    anchor_weight: torch.Tensor | None = None,
    *,
    alpha: float,
    interpolation: str = "logit",
    divergence: str = "forward_kl",
    jsd_beta: float = 0.5,
    temperature: float = 1.0,
    labels: torch.Tensor | None = None,
    ce_weight: float = 0.0,
    ignore_index: int = -100,
    loss_mask: torch.Tensor | None = None,
    loss_scale: float = 1.0,
    vocab_size: int | None = None,
    group=None,
    sequence_parallel: bool = False,
    return_metrics: bool = False,
    chunk_tokens: int | None = None,
    check_labels: bool = True,
    label_prob_weight: bool = False,
    token_rows: torch.Tensor | None = None,
):
    """``loss_scale * sum_t loss_mask_t * loss_t`` of the anchored loss, from final hidden states.

    The per-token loss ``loss_t`` and every option are those of ``vocab_parallel_anchored_loss``
    on the logits ``hidden @ weight^T`` of each role (student; reference; snapshot = ``anchor``,
    None for the live anchor), which are never materialised beyond one token chunk. Weights are
    the output layers' vocab shards ``[V_local, h]`` of the tensor-parallel group (``group``,
    default Megatron's); the hidden states are ``[..., h]`` with the leading shape of ``labels``
    and ``loss_mask`` (``[b, s / tp, h]`` under ``sequence_parallel``, gathered here). Without a
    reference (plain SFT) ``ce_weight`` must be 1.

    Returns the scalar loss (fp32, fp64 for fp64 weights) with gradients for ``student_hidden``
    and ``student_weight``, and with ``return_metrics`` a dict of ``loss_mask``-weighted sums
    over tokens of the metrics (no grad). ``chunk_tokens``: tokens per chunk (None: from
    ``anchor/chunks.py``' memory budget). ``label_prob_weight``: each token's CE (``ce_weight``
    must be 1) is further weighted by the probability of its label, held constant (Dynamic
    Fine-Tuning's ``-sg(p_theta(y)) log p_theta(y)``); the weights exist only chunk by chunk, which
    is why this is an option here rather than the caller's ``loss_mask``. ``token_rows``: int64
    indices into the flattened tokens (``labels.reshape(-1)``'s order, the sequence gathered under
    ``sequence_parallel``) of the only tokens to compute; every other token counts as ``loss_mask``
    0. Passing the rows where the mask is nonzero gives the same loss and gradients with the
    prompt and padding tokens skipped; build them where the mask is on the host (the trainer's
    collate does), as deriving them from a device mask would sync the host with the device.
    """
    _check_role("student", student_hidden, student_weight, None, None)
    _check_role("reference", reference_hidden, reference_weight, student_hidden, student_weight)
    _check_role("anchor", anchor_hidden, anchor_weight, student_hidden, student_weight)
    if reference_hidden is None and (ce_weight != 1.0 or return_metrics):
        raise ValueError("reference_hidden and reference_weight are required unless ce_weight = 1 (plain SFT) without metrics")
    group, rank, size = resolve_group(group)
    gathered = tuple(student_hidden.shape[:-1])
    if sequence_parallel and size > 1:
        if student_hidden.dim() != 3:
            raise ValueError(f"student_hidden must be [b, s / tp, h] under sequence_parallel, got shape {tuple(student_hidden.shape)}")
        gathered = (gathered[0], gathered[1] * size)
    for name, tensor in (("labels", labels), ("loss_mask", loss_mask)):
        if tensor is not None and tuple(tensor.shape) != gathered:
            raise ValueError(f"{name} shape {tuple(tensor.shape)} does not match the hidden states' tokens {gathered}"
                             + (" (sequence gathered over the tensor-parallel group)" if sequence_parallel and size > 1 else ""))
    if labels is not None and (labels.is_floating_point() or labels.is_complex()):
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if not isinstance(label_prob_weight, bool) or (label_prob_weight and ce_weight != 1.0):
        raise ValueError(f"label_prob_weight must be a bool and needs ce_weight = 1, got {label_prob_weight!r} with ce_weight={ce_weight!r}")
    if isinstance(loss_scale, bool) or not isinstance(loss_scale, numbers.Real) or not float(loss_scale) > 0.0:
        raise ValueError(f"loss_scale must be a number > 0, got {loss_scale!r}")
    spec = build_spec(alpha, interpolation, divergence, jsd_beta, temperature, ce_weight, ignore_index,
                      anchor_hidden is None, bool(return_metrics), labels)
    local_vocab = student_weight.shape[0]
    vocab_size = local_vocab * size if vocab_size is None else vocab_size
    layout = shard_layout(group, rank, size, local_vocab, vocab_size)
    check_chunk_tokens(chunk_tokens)
    if labels is not None and check_labels:
        check_label_range(labels, vocab_size, spec.ignore_index)
    if token_rows is not None:
        _check_token_rows(token_rows, gathered, student_hidden.device)
    fused = fused_passes.applies(spec, layout)
    if chunk_tokens is None:
        roles = 1 + (reference_hidden is not None) + (anchor_hidden is not None)
        dtype = compute_dtype(student_weight, reference_weight, anchor_weight)
        role_dtypes = tuple(None if h is None else w.dtype for h, w in ((student_hidden, student_weight), (reference_hidden, reference_weight),
                                                                           (anchor_hidden, anchor_weight)))
        scratch = None if fused else eager_scratch_buffers(spec, role_dtypes, dtype)
        compute_bytes = torch.empty((), dtype=dtype).element_size()
        chunk_tokens = chunks.auto_chunk_tokens(local_vocab, roles, student_weight.element_size(), fused, compute_bytes, scratch,
                                                hidden_size=student_hidden.shape[-1])
    if loss_mask is None:
        loss_mask = torch.ones(gathered, dtype=torch.float32, device=student_hidden.device)
    call = _Call(spec=spec, layout=layout, loss_scale=float(loss_scale), chunk_tokens=int(chunk_tokens), fused=fused,
                 sequence_parallel=bool(sequence_parallel), label_prob_weight=label_prob_weight)
    detach = lambda x: None if x is None else x.detach()  # noqa: E731 - no gradient reaches a frozen role
    outputs = _FusedOutputLoss.apply(
        student_hidden, student_weight, detach(reference_hidden), detach(reference_weight), detach(anchor_hidden),
        detach(anchor_weight), None if labels is None else labels.detach().long(), loss_mask.detach(), token_rows, call,
    )
    if not return_metrics:
        return outputs
    loss_sum, metric_sums = outputs
    return loss_sum, dict(zip(METRIC_NAMES, metric_sums.unbind()))
