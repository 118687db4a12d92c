"""The arithmetic of the anchored loss on one rank's vocabulary shard, in token chunks.

Notation (per token, temperature tau):
    u = z_theta / tau   student            p   = softmax(u)
    s = z_s / tau       snapshot anchor    p_s = softmax(s)   (s is u itself for the live anchor)
    r = z_r / tau       frozen reference   p_r = softmax(r)
    a = (1-alpha) s + alpha r              q   = softmax(a)   ("logit" interpolation)
                                           q   = (1-alpha) p_s + alpha p_r   ("prob")
    z = z_theta (tau = 1)                  used by the cross-entropy term

Everything global over the vocabulary is built from per-rank partial sums in at most
two collectives:

Pass A ("stats"): for every distribution needed, the local max M_i and the local
    sum S_i = sum exp(x - M_i), plus "linear" sums sum exp(x - M_i) * (y - w) whose
    global value divided by the global S is an expectation E_x[y - w]. Every forward
    KL between two softmaxes of logits is such an expectation plus two log-sum-exps,
    so the "logit" losses and all metrics need nothing else. Each rank writes its
    columns into its own slot of a [tp, tokens, k] buffer and one SUM all-reduce
    hands every rank all slots; the log-sum-exp merge happens locally. That is one
    collective instead of MAX followed by SUM, and one read of the logits instead
    of two.
Pass B ("mixture sums"): what is not linear in the logits (the probability mixture,
    JSD's middle distribution m) needs normalised log-probabilities first; these
    sums are bounded, so one plain SUM all-reduce of [tokens, k'] is enough.
Pass C ("gradient"): writes the analytic gradient of the per-token loss with
    respect to z_theta into one preallocated buffer (the only shard-sized tensor
    kept for backward); backward scales it by the incoming gradient.

Padded vocabulary columns (global index >= vocab_size) sit at the end of the
vocabulary, so on each rank the valid columns are a prefix of the shard; the passes
work on that prefix (a view, no copy) and the gradient of the padded columns is 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class LossSpec:
    """Validated options of one loss call (see loss.vocab_parallel_anchored_loss)."""

    alpha: float
    interpolation: str
    divergence: str
    jsd_beta: float
    temperature: float
    ce_weight: float
    ignore_index: int
    live_anchor: bool
    with_metrics: bool

    @property
    def need_divergence(self) -> bool:
        return self.ce_weight < 1.0

    @property
    def need_ce(self) -> bool:
        return self.ce_weight > 0.0

    def canon(self, name: str) -> str:
        """The distribution ``name`` is numerically identical to (shares its statistics)."""
        if name == "z" and self.temperature == 1.0:
            return "u"
        if name == "s" and self.live_anchor:
            return "u"
        if name == "a":
            if self.alpha == 0.0:
                return self.canon("s")
            if self.alpha == 1.0:
                return "r"
        return name


@dataclass(frozen=True)
class ShardLayout:
    """Where this rank's shard sits in the (padded) vocabulary."""

    group: object
    rank: int
    size: int
    local_vocab: int  # columns in this rank's shard, padding included
    valid_local: int  # leading columns of the shard that are real tokens
    vocab_start: int  # global index of the shard's first column


@dataclass(frozen=True)
class StatsPlan:
    dists: tuple[str, ...]  # distributions whose (max, sum-exp) are needed
    terms: tuple[tuple[str, str, str | None], ...]  # (weight dist, plus, minus): E_weight[plus - minus]
    with_label: bool
    # The dist whose exp(x - local max) pass A leaves in the gradient buffer for pass C:
    # q for the forward KL with logit interpolation (saves rebuilding a), else p (or the
    # tau=1 softmax when only the CE term is on).
    stored: str

    @property
    def width(self) -> int:
        return 2 * len(self.dists) + len(self.terms) + int(self.with_label)


def plan_stats(spec: LossSpec) -> StatsPlan:
    dists: list[str] = []
    terms: list[tuple[str, str, str | None]] = []

    def need(name: str) -> None:
        name = spec.canon(name)
        if name not in dists:
            dists.append(name)

    def term(weight: str, plus: str, minus: str | None = None) -> None:
        key = (spec.canon(weight), spec.canon(plus), spec.canon(minus) if minus else None)
        need(weight)
        if key not in terms:
            terms.append(key)

    if spec.need_divergence:
        need("u")
        if spec.interpolation == "logit":
            need("a")
            if spec.divergence == "forward_kl":
                term("a", "a", "u")
            elif spec.divergence == "reverse_kl":
                term("u", "u", "a")
        else:
            need("s")
            need("r")
    if spec.need_ce:
        need("z")
    if spec.with_metrics:
        term("u", "u")
        term("r", "r", "u")
        term("r", "r", "s")
        if spec.interpolation == "logit":
            term("a", "a", "s")
            term("s", "r", "s")
        else:
            need("s")
    if spec.need_divergence:
        forward_logit = spec.interpolation == "logit" and spec.divergence == "forward_kl"
        stored = spec.canon("a") if forward_logit else "u"
    else:
        stored = spec.canon("z")
    return StatsPlan(tuple(dists), tuple(terms), spec.need_ce, stored)


def plan_mixture_sums(spec: LossSpec) -> tuple[str, ...]:
    """Names of the pass-B sums this call needs (empty: no pass B, no second collective)."""
    names = []
    if spec.need_divergence:
        if spec.divergence == "jsd":
            names += ["kl_q_m", "kl_p_m"]
        elif spec.interpolation == "prob":
            names.append("forward_prob" if spec.divergence == "forward_kl" else "reverse_prob")
    if spec.with_metrics and spec.interpolation == "prob":
        names.append("step_prob")
    return tuple(names)


class Workspace:
    """Chunk-sized scratch tensors, allocated once per call and reused by every chunk.

    A fresh [chunk, V_local] allocation per op is slow on CPU (new pages fault in on first
    touch) and churns the caching allocator on GPU; each key names one temporary whose
    lifetime is a single chunk, so reuse across chunks is safe.
    """

    def __init__(self, rows: int, cols: int, dtype: torch.dtype, device: torch.device):
        self.rows, self.cols, self.dtype, self.device = rows, cols, dtype, device
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, key: str, n: int) -> torch.Tensor:
        buffer = self._buffers.get(key)
        if buffer is None:
            buffer = self._buffers[key] = torch.empty(self.rows, self.cols, dtype=self.dtype, device=self.device)
        return buffer[:n]


class TokenChunk:
    """Lazily built compute-dtype tensors for rows ``rows`` of the valid vocab prefix.

    The tensors it hands out may alias the caller's logits: never modify them in place.
    """

    def __init__(self, sources: dict, rows: slice, layout: ShardLayout, spec: LossSpec, work: Workspace):
        self._sources, self.rows, self._layout, self.spec, self.work = sources, rows, layout, spec, work
        self.n = rows.stop - rows.start
        self._cache: dict[str, torch.Tensor] = {}

    def scratch(self, key: str) -> torch.Tensor:
        return self.work.get(key, self.n)

    def _scaled(self, source: str, temperature: float, key: str) -> torch.Tensor:
        x = self._sources[source][self.rows, : self._layout.valid_local]
        if x.dtype != self.work.dtype:  # convert first so that the division runs in fp32
            x = self.scratch(key).copy_(x)
            return x if temperature == 1.0 else x.div_(temperature)
        if temperature != 1.0:
            return torch.div(x, temperature, out=self.scratch(key))
        return x  # the caller's own tensor: read only

    def __getitem__(self, name: str) -> torch.Tensor:
        spec = self.spec
        name = spec.canon(name)
        if name not in self._cache:
            if name == "u":
                value = self._scaled("student", spec.temperature, "u")
            elif name == "z":
                value = self._scaled("student", 1.0, "z")
            elif name == "s":
                value = self._scaled("anchor", spec.temperature, "s")
            elif name == "r":
                value = self._scaled("reference", spec.temperature, "r")
            elif name == "a":  # s + alpha (r - s): one op once r - s exists, and r - s is reused
                value = torch.add(self["s"], self.difference("r", "s")[0], alpha=spec.alpha, out=self.scratch("a"))
            else:
                raise KeyError(name)
            self._cache[name] = value
        return self._cache[name]

    def difference(self, plus: str, minus: str) -> tuple[torch.Tensor, float]:
        """(d, c) with plus - minus = c * d, reusing r - s for a - s = alpha (r - s)."""
        spec = self.spec
        plus, minus = spec.canon(plus), spec.canon(minus)
        if plus == spec.canon("a") == "a" and minus == spec.canon("s"):
            return self.difference("r", "s")[0], spec.alpha
        key = f"{plus}-{minus}"
        if key not in self._cache:
            self._cache[key] = torch.sub(self[plus], self[minus], out=self.scratch(key))
        return self._cache[key], 1.0

    def row_dot(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """sum(x * y, -1) through a scratch product."""
        return torch.mul(x, y, out=self.scratch("dot")).sum(dim=-1)


def chunk_rows(num_tokens: int, chunk_tokens: int):
    for start in range(0, num_tokens, chunk_tokens):
        yield slice(start, min(start + chunk_tokens, num_tokens))


def _owned_label_index(labels, layout: ShardLayout, spec: LossSpec):
    """(local column clamped into the shard, whether this rank owns the label and it counts)."""
    local_index = labels - layout.vocab_start
    owned = (local_index >= 0) & (local_index < layout.valid_local) & (labels != spec.ignore_index)
    return local_index.clamp(0, layout.valid_local - 1), owned


def label_logits(student, labels, layout: ShardLayout, spec: LossSpec, dtype) -> torch.Tensor:
    """Each token's student logit at its label where this rank owns the label, else 0 (summed
    over ranks, the label logit)."""
    local_index, owned = _owned_label_index(labels, layout, spec)
    picked = student.gather(-1, local_index.unsqueeze(-1)).squeeze(-1)
    return torch.where(owned, picked.to(dtype), 0.0)


def subtract_label_onehot(grad, labels, layout: ShardLayout, spec: LossSpec) -> None:
    """grad[t, label_t] -= ce_weight on the tokens whose label this rank owns (the CE term's
    one-hot part; ``grad`` covers the valid columns)."""
    local_index, owned = _owned_label_index(labels, layout, spec)
    grad.scatter_add_(-1, local_index.unsqueeze(-1), owned.to(grad.dtype).mul_(-spec.ce_weight).unsqueeze(-1))


def local_stats(sources, plan: StatsPlan, layout: ShardLayout, spec: LossSpec, work: Workspace, chunk_tokens: int, keep=None) -> torch.Tensor:
    """Pass A on this rank: [tokens, plan.width] of (max, sum-exp) per dist, linear sums, label logit.

    ``keep`` (the gradient buffer, or None) receives exp(x - local max) of ``plan.stored``.
    """
    student = sources["student"]
    num_tokens = student.shape[0]
    out = torch.zeros(num_tokens, plan.width, dtype=work.dtype, device=student.device)
    num_dists = len(plan.dists)
    if layout.valid_local == 0:  # this rank holds only padding
        out[:, :num_dists] = -math.inf
        return out
    for rows in chunk_rows(num_tokens, chunk_tokens):
        chunk = TokenChunk(sources, rows, layout, spec, work)
        for d_index, name in enumerate(plan.dists):
            x = chunk[name]
            row_max = x.amax(dim=-1, keepdim=True)
            if keep is not None and name == plan.stored:
                target = keep[rows, : layout.valid_local]
            else:
                target = chunk.scratch("weights")
            weights = torch.sub(x, row_max, out=target).exp_()
            out[rows, d_index] = row_max.squeeze(-1)
            out[rows, num_dists + d_index] = weights.sum(dim=-1)
            for t_index, (weight, plus, minus) in enumerate(plan.terms):
                if weight != name or plus == minus:
                    continue
                value, factor = (chunk[plus], 1.0) if minus is None else chunk.difference(plus, minus)
                dot = chunk.row_dot(weights, value)
                out[rows, 2 * num_dists + t_index] = dot if factor == 1.0 else dot * factor
        if plan.with_label:
            out[rows, -1] = label_logits(student[rows], sources["labels"][rows], layout, spec, work.dtype)
    return out


def all_slots(local: torch.Tensor, layout: ShardLayout) -> torch.Tensor:
    """[tp, ...]: every rank's ``local`` via one SUM all-reduce (each rank fills its own slot)."""
    if layout.size == 1:
        return local.unsqueeze(0)
    slots = local.new_zeros((layout.size,) + tuple(local.shape))
    slots[layout.rank].copy_(local)
    dist.all_reduce(slots, op=dist.ReduceOp.SUM, group=layout.group)
    return slots


@dataclass
class GlobalStats:
    """Per-token global quantities after pass A."""

    lse: dict  # dist -> [tokens] log-sum-exp over the whole vocabulary
    expect: dict  # (weight, plus, minus) -> [tokens] expectation under softmax(weight)
    label_logit: torch.Tensor | None


def merge_stats(slots: torch.Tensor, plan: StatsPlan) -> GlobalStats:
    num_dists = len(plan.dists)
    rank_max = slots[..., :num_dists]
    global_max = rank_max.amax(dim=0)
    rescale = (rank_max - global_max).exp()  # ranks holding only padding: exp(-inf) = 0
    sum_exp = (rescale * slots[..., num_dists : 2 * num_dists]).sum(dim=0)
    lse = {name: global_max[:, i] + sum_exp[:, i].log() for i, name in enumerate(plan.dists)}
    expect = {}
    for t_index, key in enumerate(plan.terms):
        weight, plus, minus = key
        d_index = plan.dists.index(weight)
        if plus == minus:
            expect[key] = torch.zeros_like(global_max[:, 0])
            continue
        total = (rescale[..., d_index] * slots[..., 2 * num_dists + t_index]).sum(dim=0)
        expect[key] = total / sum_exp[:, d_index]
    label_logit = slots[..., -1].sum(dim=0) if plan.with_label else None
    return GlobalStats(lse, expect, label_logit)


class NormalisedChunk:
    """Log-probabilities of one chunk once the global log-sum-exps are known."""

    def __init__(self, chunk: TokenChunk, stats: GlobalStats):
        self.chunk, self.stats, self.spec = chunk, stats, chunk.spec
        self._cache: dict[str, torch.Tensor] = {}

    def _row_lse(self, name: str) -> torch.Tensor:
        return self.stats.lse[name][self.chunk.rows].unsqueeze(-1)

    def logp(self, name: str) -> torch.Tensor:
        name = self.spec.canon(name)
        if name not in self._cache:
            self._cache[name] = torch.sub(self.chunk[name], self._row_lse(name), out=self.chunk.scratch(f"logp_{name}"))
        return self._cache[name]

    def probs(self, name: str, key: str) -> torch.Tensor:
        """softmax of ``name`` in scratch ``key`` (the caller may modify it in place)."""
        name = self.spec.canon(name)
        out = self.chunk.scratch(key)
        if name in self._cache:
            return torch.exp(self._cache[name], out=out)
        return torch.sub(self.chunk[name], self._row_lse(name), out=out).exp_()

    def log_anchor(self) -> torch.Tensor:
        """log q."""
        spec = self.spec
        if spec.interpolation == "logit" or spec.alpha in (0.0, 1.0):
            return self.logp("a")
        if "log_q" not in self._cache:
            work = self.chunk.scratch("log_q")
            shifted_r = torch.add(self.logp("r"), math.log(spec.alpha), out=self.chunk.scratch("log_q_tmp"))
            torch.add(self.logp("s"), math.log1p(-spec.alpha), out=work)
            self._cache["log_q"] = torch.logaddexp(work, shifted_r, out=work)
        return self._cache["log_q"]

    def anchor_probs(self, key: str) -> torch.Tensor:
        """q in scratch ``key``; the mixture itself for "prob" (exact, no log round trip)."""
        spec = self.spec
        if spec.interpolation == "logit" or spec.alpha in (0.0, 1.0):
            return self.probs("a", key)
        mixed = self.probs("s", key).mul_(1.0 - spec.alpha)
        return mixed.add_(self.probs("r", "anchor_probs_tmp"), alpha=spec.alpha)

    def log_middle(self) -> torch.Tensor:
        """log m for JSD, m = beta q + (1 - beta) p."""
        beta = self.spec.jsd_beta
        if beta == 0.0:
            return self.logp("u")
        if beta == 1.0:
            return self.log_anchor()
        if "log_m" not in self._cache:
            work = self.chunk.scratch("log_m")
            shifted_p = torch.add(self.logp("u"), math.log1p(-beta), out=self.chunk.scratch("log_m_tmp"))
            torch.add(self.log_anchor(), math.log(beta), out=work)
            self._cache["log_m"] = torch.logaddexp(work, shifted_p, out=work)
        return self._cache["log_m"]

    def log_ratio(self, plus: torch.Tensor, minus: torch.Tensor) -> torch.Tensor:
        return torch.sub(plus, minus, out=self.chunk.scratch("log_ratio"))


def local_mixture_sums(sources, names, stats, layout, spec, work: Workspace, chunk_tokens) -> torch.Tensor:
    """Pass B on this rank: [tokens, len(names)] partial sums over the local valid columns."""
    num_tokens = sources["student"].shape[0]
    out = torch.zeros(num_tokens, len(names), dtype=work.dtype, device=sources["student"].device)
    if layout.valid_local == 0:
        return out
    for rows in chunk_rows(num_tokens, chunk_tokens):
        chunk = TokenChunk(sources, rows, layout, spec, work)
        norm = NormalisedChunk(chunk, stats)
        for col, name in enumerate(names):
            if name == "forward_prob":  # KL(q || p)
                value = chunk.row_dot(norm.anchor_probs("q"), norm.log_ratio(norm.log_anchor(), norm.logp("u")))
            elif name == "reverse_prob":  # KL(p || q)
                value = chunk.row_dot(norm.probs("u", "p"), norm.log_ratio(norm.logp("u"), norm.log_anchor()))
            elif name == "kl_q_m":
                value = chunk.row_dot(norm.anchor_probs("q"), norm.log_ratio(norm.log_anchor(), norm.log_middle()))
            elif name == "kl_p_m":
                value = chunk.row_dot(norm.probs("u", "p"), norm.log_ratio(norm.logp("u"), norm.log_middle()))
            elif name == "step_prob":  # KL(q || p_s)
                value = chunk.row_dot(norm.anchor_probs("q"), norm.log_ratio(norm.log_anchor(), norm.logp("s")))
            else:
                raise KeyError(name)
            out[rows, col] = value
    return out


def sum_over_ranks(local: torch.Tensor, layout: ShardLayout) -> torch.Tensor:
    if layout.size > 1:
        dist.all_reduce(local, op=dist.ReduceOp.SUM, group=layout.group)
    return local


def fill_gradient(grad, local, plan, sources, stats, divergence_value, kl_p_m, layout, spec, work: Workspace, chunk_tokens) -> None:
    """Pass C: grad[:, :valid] = d(per-token loss)/d z_theta; grad[:, valid:] = 0.

    forward KL:  tau (p - q)
    reverse KL:  tau p (log p - log q - KL(p||q))
    JSD:         tau (1 - beta) p (log p - log m - KL(p||m))
    CE (tau=1):  softmax(z) - onehot(label)   (0 on ignored tokens)
    combined as (1 - w) * divergence part + w * CE part. On entry grad[:, :valid] holds
    exp(x - local max) of ``plan.stored`` (pass A); a per-row factor turns it into probabilities.
    """
    grad[:, layout.valid_local :].zero_()
    if layout.valid_local == 0:
        return
    num_tokens = grad.shape[0]
    tau, w = spec.temperature, spec.ce_weight
    k = (1.0 - w) * tau  # weight of the divergence gradient
    stored_index = plan.dists.index(plan.stored)
    to_probs = (local[:, stored_index] - stats.lse[plan.stored]).exp().unsqueeze(-1)
    for rows in chunk_rows(num_tokens, chunk_tokens):
        chunk = TokenChunk(sources, rows, layout, spec, work)
        norm = NormalisedChunk(chunk, stats)
        out = grad[rows, : layout.valid_local]
        ce_row_weight = None  # w on kept tokens, 0 on ignored ones: [n, 1]
        if spec.need_ce:
            labels = sources["labels"][rows]
            ce_row_weight = (labels != spec.ignore_index).to(work.dtype).mul_(w).unsqueeze(-1)
        ce_probs_done = False
        if not spec.need_divergence:  # CE only: out = w softmax(z)
            out.mul_(to_probs[rows] * ce_row_weight)
            ce_probs_done = True
        elif plan.stored != "u":  # forward KL, logit: out holds q's weights
            p = norm.probs("u", "p")
            out.mul_(to_probs[rows] * -k).add_(p, alpha=k)
            if spec.need_ce and tau == 1.0:
                out.addcmul_(p, ce_row_weight)
                ce_probs_done = True
        else:  # out holds p's weights
            out.mul_(to_probs[rows])
            ce_here = spec.need_ce and tau == 1.0
            if spec.divergence == "forward_kl":
                out.mul_(k + ce_row_weight if ce_here else k).sub_(norm.anchor_probs("q"), alpha=k)
            else:
                if spec.divergence == "reverse_kl":
                    shift = norm.log_ratio(norm.logp("u"), norm.log_anchor())
                    shift.sub_(divergence_value[rows].unsqueeze(-1)).mul_(k)
                else:
                    shift = norm.log_ratio(norm.logp("u"), norm.log_middle())
                    shift.sub_(kl_p_m[rows].unsqueeze(-1)).mul_(k * (1.0 - spec.jsd_beta))
                if ce_here:
                    shift.add_(ce_row_weight)
                out.mul_(shift)
            ce_probs_done = ce_here
        if spec.need_ce:
            if not ce_probs_done:
                out.addcmul_(norm.probs("z", "p_ce"), ce_row_weight)
            subtract_label_onehot(out, sources["labels"][rows], layout, spec)
