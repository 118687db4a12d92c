"""Fused kernels (``torch.compile``) for passes A and C of the anchored loss's main case.

The eager passes in ``vocab_passes`` spend one torch op (one trip through memory) per
elementwise step: pass A alone reads and writes the [tokens, V_local] shard some fifteen
times. Compiled, each pass becomes one loop nest per distribution that reads the logits,
keeps every intermediate in registers and writes only what leaves the pass (the row
statistics and, once, the weights kept for the gradient); Inductor emits C++/OpenMP on
CPU and Triton on GPU from the same source.

Covered: ``interpolation="logit"``, ``divergence="forward_kl"``, 0 < alpha <= 1 (alpha 1 is
distillation: q is the reference's softmax), with or without metrics, live or snapshot anchor, any
temperature, and the cross-entropy term at temperature 1 (where its softmax is p itself).
Everything else keeps the eager passes (alpha 0, where q is the anchor alone, among them).
The kernels produce exactly the eager layouts (``StatsPlan`` columns; the gradient
buffer), so merging across ranks and the loss assembly are shared.

alpha and 1/tau enter as 0-dim tensors: a float argument would be baked into the graph
and an alpha schedule would recompile on every step. Shapes are dynamic (the last chunk
is shorter; V_local differs between models), so one graph serves every call of a plan.

``ANCHORED_FUSED_LOSS=0`` switches the kernels off. If compilation itself fails (no C++
compiler, no Triton), the call falls back to the eager passes and warns once.
"""

from __future__ import annotations

import os
import warnings

import torch

from anchored_megatron.anchor.vocab_passes import (
    LossSpec, ShardLayout, StatsPlan, Workspace, chunk_rows, label_logits, subtract_label_onehot,
)

_ENV = "ANCHORED_FUSED_LOSS"
# Auto chunk size of the fused passes, in elements: the compiled loops keep intermediates in
# registers (at most one chunk-sized buffer), so chunks can be larger than the eager passes'
# and each call's fixed cost (guards, launch) is paid less often.
CHUNK_ELEMENTS = 1 << 22
_compile_failed = False


def applies(spec: LossSpec, layout: ShardLayout) -> bool:
    """Whether this call runs the fused kernels."""
    if _compile_failed or os.environ.get(_ENV, "1").strip().lower() in ("0", "false", "off", "no"):
        return False
    if layout.valid_local == 0:  # a rank holding only padding has nothing to compute
        return False
    return (spec.interpolation == "logit" and spec.divergence == "forward_kl" and 0.0 < spec.alpha <= 1.0
            and spec.need_divergence and not (spec.need_ce and spec.temperature != 1.0))


def disable_after_failure(error: BaseException) -> None:
    global _compile_failed
    _compile_failed = True
    warnings.warn(f"anchored loss: torch.compile failed ({type(error).__name__}: {error}); "
                  f"using the eager passes from now on (set {_ENV}=0 to skip the attempt)", RuntimeWarning, stacklevel=3)


def compile_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean "the compiler is unusable here" (no C++ compiler or Triton, a Dynamo
    that cannot trace the kernels, more graphs than the limit), as opposed to a bug in a call:
    those are raised again by the eager passes."""
    from torch._dynamo.exc import BackendCompilerFailed, FailOnRecompileLimitHit, Unsupported
    from torch._inductor.exc import InductorError

    return (BackendCompilerFailed, InductorError, Unsupported, FailOnRecompileLimitHit, OSError)


def _stats_kernel(dists, terms, stored, anchor_name, student, reference, anchor, keep, alpha, inv_tau):
    """Pass A for one chunk: [rows, plan.width - label] in the ``StatsPlan`` column order;
    ``keep`` receives exp(x - row max) of ``stored``. Names are canonical (LossSpec.canon)."""
    compute = keep.dtype
    values = {}

    def value(name):
        if name not in values:
            if name == "u":
                values[name] = student.to(compute) * inv_tau
            elif name == "r":
                values[name] = reference.to(compute) * inv_tau
            elif name == "s":
                values[name] = anchor.to(compute) * inv_tau
            elif name == "a":  # s + alpha (r - s)
                values[name] = value(anchor_name) + alpha * difference("r", anchor_name)
            else:
                raise KeyError(name)
        return values[name]

    def difference(plus, minus):
        if plus == "a" and minus == anchor_name:  # a - s = alpha (r - s) exactly, no cancellation
            return alpha * difference("r", anchor_name)
        return value(plus) - value(minus)

    maxima, sums, expectations = [], [], [None] * len(terms)
    for name in dists:
        x = value(name)
        row_max = x.amax(dim=-1, keepdim=True)
        weights = torch.exp(x - row_max)
        if name == stored:
            keep.copy_(weights)
        maxima.append(row_max.squeeze(-1))
        sums.append(weights.sum(dim=-1))
        for index, (weight, plus, minus) in enumerate(terms):
            if weight != name:
                continue
            if plus == minus:
                expectations[index] = torch.zeros_like(maxima[-1])
            else:
                expectations[index] = (weights * (value(plus) if minus is None else difference(plus, minus))).sum(dim=-1)
    return torch.stack(maxima + sums + expectations, dim=-1)


def _gradient_kernel(student, keep, lse_u, keep_factor, p_factor, inv_tau):
    """keep <- keep * keep_factor + softmax(u) * p_factor (per-row factors [rows, 1])."""
    p = torch.exp(student.to(keep.dtype) * inv_tau - lse_u)
    keep.copy_(keep * keep_factor + p * p_factor)


_compiled: dict = {}
# One graph per (plan, compute dtype, layout) the process meets, plus Dynamo's own
# specialisations of size-1 chunks and of padded (strided) shards: more than its default
# limit of 8 per function when a run mixes options, far fewer than this.
_GRAPHS_PER_KERNEL = 64


def _kernel(name: str):
    if name not in _compiled:
        function = {"stats": _stats_kernel, "gradient": _gradient_kernel}[name]
        compiled = torch.compile(function, dynamic=True, fullgraph=True)

        def call(*args):
            with torch._dynamo.config.patch(recompile_limit=_GRAPHS_PER_KERNEL):
                return compiled(*args)

        def first_call(*args):
            # The first call compiles; from the on-disk cache when an earlier run left it there.
            marker = _compiled_marker(name, args[-1].device)
            if not os.path.exists(marker):
                _announce_cold_compile(os.path.dirname(os.path.dirname(marker)))
            result = call(*args)
            os.makedirs(os.path.dirname(marker), exist_ok=True)
            open(marker, "w").close()
            _compiled[name] = call
            return result

        _compiled[name] = first_call
    return _compiled[name]


# Compiles the disk cache cannot serve are announced once per process to this callable (the
# trainer's log); None keeps the library silent.
_reporter = None
_announced = False


def report_compiles_to(reporter) -> None:
    """Send a line to ``reporter(text)`` before the first compile that has no cached result (a
    first run on this machine, a new torch, a cleared cache); None: say nothing."""
    global _reporter
    _reporter = reporter


def _compiled_marker(name: str, device: torch.device) -> str:
    """A file in Inductor's cache that says this kernel has been compiled into it before: keyed by
    the kernels' source, the torch version and the device type, as the cached code is."""
    import hashlib

    from torch._inductor.runtime.cache_dir_utils import cache_dir

    with open(__file__, "rb") as fh:
        source = fh.read()
    key = hashlib.sha256(source + torch.__version__.encode() + device.type.encode()).hexdigest()[:16]
    return os.path.join(cache_dir(), "anchored_megatron", f"{name}-{key}")


def _announce_cold_compile(cache_dir: str) -> None:
    global _announced
    if _reporter is not None and not _announced:
        _announced = True
        _reporter(f"compiling the anchored loss kernels: tens of seconds, once; later runs load them from {cache_dir}")


def _scalar(value: float, like: torch.Tensor) -> torch.Tensor:
    return torch.full((), value, dtype=like.dtype, device=like.device)


def local_stats(sources, plan: StatsPlan, layout: ShardLayout, spec: LossSpec, work: Workspace, chunk_tokens: int, keep=None) -> torch.Tensor:
    """Fused pass A; same result layout as ``vocab_passes.local_stats``."""
    student = sources["student"]
    num_tokens = student.shape[0]
    out = torch.empty(num_tokens, plan.width, dtype=work.dtype, device=student.device)
    valid = layout.valid_local
    alpha, inv_tau = _scalar(spec.alpha, out), _scalar(1.0 / spec.temperature, out)
    kernel = _kernel("stats")
    anchor = sources["anchor"]
    for rows in chunk_rows(num_tokens, chunk_tokens):
        target = keep[rows, :valid] if keep is not None else work.get("weights", rows.stop - rows.start)
        columns = kernel(
            plan.dists, plan.terms, plan.stored, spec.canon("s"),
            student[rows, :valid], sources["reference"][rows, :valid], None if anchor is None else anchor[rows, :valid],
            target, alpha, inv_tau,
        )
        out[rows, : columns.shape[1]] = columns
    if plan.with_label:
        out[:, -1] = label_logits(student, sources["labels"], layout, spec, work.dtype)
    return out


def fill_gradient(grad, local, plan: StatsPlan, sources, stats, layout: ShardLayout, spec: LossSpec, chunk_tokens: int) -> None:
    """Fused pass C: tau (1 - w) (p - q) + w (p - onehot) on kept tokens, 0 on padded columns.

    On entry grad[:, :valid] holds exp(a - local max) (pass A), which a per-row factor turns
    into q; the cross-entropy softmax is p because the fused path has tau = 1 when w > 0.
    """
    valid = layout.valid_local
    grad[:, valid:].zero_()
    tau, w = spec.temperature, spec.ce_weight
    k = (1.0 - w) * tau
    stored_index = plan.dists.index(plan.stored)
    keep_factor = ((local[:, stored_index] - stats.lse[plan.stored]).exp() * -k).unsqueeze(-1)
    p_factor = torch.full_like(keep_factor, k)
    if spec.need_ce:
        labels = sources["labels"]
        ce_row_weight = (labels != spec.ignore_index).to(grad.dtype).mul_(w)
        p_factor = p_factor + ce_row_weight.unsqueeze(-1)
    lse_u = stats.lse["u"].unsqueeze(-1)
    inv_tau = _scalar(1.0 / tau, grad)
    kernel = _kernel("gradient")
    student = sources["student"]
    for rows in chunk_rows(grad.shape[0], chunk_tokens):
        kernel(student[rows, :valid], grad[rows, :valid], lse_u[rows], keep_factor[rows], p_factor[rows], inv_tau)
    if spec.need_ce:
        subtract_label_onehot(grad[:, :valid], sources["labels"], layout, spec)
