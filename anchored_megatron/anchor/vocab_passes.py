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


class TokenChunk:
    """Lazily built compute-dtype views of rows [start, stop) of the valid vocab prefix.

    The tensors it hands out may alias the caller's logits: never modify them in place.
    """

    def __init__(self, sources: dict, rows: slice, layout: ShardLayout, spec: LossSpec, dtype: torch.dtype):
        self._sources, self._rows, self._layout, self._spec, self._dtype = sources, rows, layout, spec, dtype
        self._cache: dict[str, torch.Tensor] = {}

    def _scaled(self, source: str, temperature: float) -> torch.Tensor:
        x = self._sources[source][self._rows, : self._layout.valid_local].to(self._dtype)
        return x if temperature == 1.0 else x / temperature

    def __getitem__(self, name: str) -> torch.Tensor:
        spec = self._spec
        name = spec.canon(name)
        if name not in self._cache:
            if name == "u":
                value = self._scaled("student", spec.temperature)
            elif name == "z":
                value = self._scaled("student", 1.0)
            elif name == "s":
                value = self._scaled("anchor", spec.temperature)
            elif name == "r":
                value = self._scaled("reference", spec.temperature)
            elif name == "a":  # s + alpha (r - s): one op once r - s exists, and r - s is reused below
                value = torch.add(self["s"], self.difference("r", "s")[0], alpha=spec.alpha)
            else:
                raise KeyError(name)
            self._cache[name] = value
        return self._cache[name]

    def difference(self, plus: str, minus: str) -> tuple[torch.Tensor, float]:
        """(d, c) with plus - minus = c * d, reusing r - s for a - s = alpha (r - s)."""
        spec = self._spec
        plus, minus = spec.canon(plus), spec.canon(minus)
        if plus == spec.canon("a") == "a" and minus == spec.canon("s"):
            return self.difference("r", "s")[0], spec.alpha
        key = f"{plus}-{minus}"
        if key not in self._cache:
            self._cache[key] = self[plus] - self[minus]
        return self._cache[key], 1.0


def _row_dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x * y).sum(dim=-1)


def chunk_rows(num_tokens: int, chunk_tokens: int):
    for start in range(0, num_tokens, chunk_tokens):
        yield slice(start, min(start + chunk_tokens, num_tokens))


def _owned_label_index(labels, layout: ShardLayout, spec: LossSpec):
    """(local column clamped into the shard, whether this rank owns the label and it counts)."""
    local_index = labels - layout.vocab_start
    owned = (local_index >= 0) & (local_index < layout.valid_local) & (labels != spec.ignore_index)
    return local_index.clamp(0, layout.valid_local - 1), owned


def local_stats(sources, plan: StatsPlan, layout: ShardLayout, spec: LossSpec, dtype, chunk_tokens: int, keep=None) -> torch.Tensor:
    """Pass A on this rank: [tokens, plan.width] of (max, sum-exp) per dist, linear sums, label logit.

    ``keep`` (the gradient buffer, or None) receives exp(x - local max) of ``plan.stored``.
    """
    student = sources["student"]
    num_tokens = student.shape[0]
    out = torch.zeros(num_tokens, plan.width, dtype=dtype, device=student.device)
    num_dists = len(plan.dists)
    if layout.valid_local == 0:  # this rank holds only padding
        out[:, :num_dists] = -math.inf
        return out
    for rows in chunk_rows(num_tokens, chunk_tokens):
        chunk = TokenChunk(sources, rows, layout, spec, dtype)
        for d_index, name in enumerate(plan.dists):
            x = chunk[name]
            row_max = x.amax(dim=-1, keepdim=True)
            if keep is not None and name == plan.stored:
                weights = torch.sub(x, row_max, out=keep[rows, : layout.valid_local])
            else:
                weights = x - row_max
            weights.exp_()
            out[rows, d_index] = row_max.squeeze(-1)
            out[rows, num_dists + d_index] = weights.sum(dim=-1)
            for t_index, (weight, plus, minus) in enumerate(plan.terms):
                if weight != name or plus == minus:
                    continue
                value, factor = (chunk[plus], 1.0) if minus is None else chunk.difference(plus, minus)
                dot = _row_dot(weights, value)
                out[rows, 2 * num_dists + t_index] = dot if factor == 1.0 else dot * factor
            del weights
        if plan.with_label:
            local_index, owned = _owned_label_index(sources["labels"][rows], layout, spec)
            picked = student[rows].gather(-1, local_index.unsqueeze(-1)).squeeze(-1)
            out[rows, -1] = torch.where(owned, picked.to(dtype), 0.0)
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

    def __init__(self, chunk: TokenChunk, stats: GlobalStats, rows: slice, spec: LossSpec):
        self.chunk, self.stats, self.rows, self.spec = chunk, stats, rows, spec
        self._cache: dict[str, torch.Tensor] = {}

    def logp(self, name: str) -> torch.Tensor:
        name = self.spec.canon(name)
        if name not in self._cache:
            self._cache[name] = self.chunk[name] - self.stats.lse[name][self.rows].unsqueeze(-1)
        return self._cache[name]

    def probs(self, name: str) -> torch.Tensor:
        """exp(log-probs) as a fresh tensor (safe to modify in place)."""
        name = self.spec.canon(name)
        if name in self._cache:
            return self._cache[name].exp()
        return (self.chunk[name] - self.stats.lse[name][self.rows].unsqueeze(-1)).exp_()

    def log_anchor(self) -> torch.Tensor:
        """log q."""
        spec = self.spec
        if spec.interpolation == "logit" or spec.alpha in (0.0, 1.0):
            return self.logp("a")
        if "log_q" not in self._cache:
            self._cache["log_q"] = torch.logaddexp(
                self.logp("s") + math.log1p(-spec.alpha), self.logp("r") + math.log(spec.alpha)
            )
        return self._cache["log_q"]

    def anchor_probs(self) -> torch.Tensor:
        """q, as the mixture itself for "prob" (cheaper and exact, no log round trip)."""
        spec = self.spec
        if spec.interpolation == "logit" or spec.alpha in (0.0, 1.0):
            return self.probs("a")
        return self.probs("s").mul_(1.0 - spec.alpha).add_(self.probs("r"), alpha=spec.alpha)

    def log_middle(self) -> torch.Tensor:
        """log m for JSD, m = beta q + (1 - beta) p."""
        beta = self.spec.jsd_beta
        if beta == 0.0:
            return self.logp("u")
        if beta == 1.0:
            return self.log_anchor()
        if "log_m" not in self._cache:
            self._cache["log_m"] = torch.logaddexp(self.log_anchor() + math.log(beta), self.logp("u") + math.log1p(-beta))
        return self._cache["log_m"]


def local_mixture_sums(sources, names, stats, layout, spec, dtype, chunk_tokens) -> torch.Tensor:
    """Pass B on this rank: [tokens, len(names)] partial sums over the local valid columns."""
    num_tokens = sources["student"].shape[0]
    out = torch.zeros(num_tokens, len(names), dtype=dtype, device=sources["student"].device)
    if layout.valid_local == 0:
        return out
    for rows in chunk_rows(num_tokens, chunk_tokens):
        norm = NormalisedChunk(TokenChunk(sources, rows, layout, spec, dtype), stats, rows, spec)
        for col, name in enumerate(names):
            if name == "forward_prob":  # KL(q || p)
                value = _row_dot(norm.anchor_probs(), norm.log_anchor() - norm.logp("u"))
            elif name == "reverse_prob":  # KL(p || q)
                value = _row_dot(norm.probs("u"), norm.logp("u") - norm.log_anchor())
            elif name == "kl_q_m":
                value = _row_dot(norm.anchor_probs(), norm.log_anchor() - norm.log_middle())
            elif name == "kl_p_m":
                value = _row_dot(norm.probs("u"), norm.logp("u") - norm.log_middle())
            elif name == "step_prob":  # KL(q || p_s)
                value = _row_dot(norm.anchor_probs(), norm.log_anchor() - norm.logp("s"))
            else:
                raise KeyError(name)
            out[rows, col] = value
    return out


def sum_over_ranks(local: torch.Tensor, layout: ShardLayout) -> torch.Tensor:
    if layout.size > 1:
        local = local.clone()
        dist.all_reduce(local, op=dist.ReduceOp.SUM, group=layout.group)
    return local


def fill_gradient(grad, local, plan, sources, stats, divergence_value, kl_p_m, layout, spec, dtype, chunk_tokens) -> None:
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
        norm = NormalisedChunk(TokenChunk(sources, rows, layout, spec, dtype), stats, rows, spec)
        out = grad[rows, : layout.valid_local]
        ce_row_weight = None  # w on kept tokens, 0 on ignored ones: [n, 1]
        if spec.need_ce:
            labels = sources["labels"][rows]
            ce_row_weight = (labels != spec.ignore_index).to(dtype).mul_(w).unsqueeze(-1)
        ce_probs_done = False
        if not spec.need_divergence:  # CE only: out = softmax(z)
            out.mul_(to_probs[rows] * ce_row_weight)
            ce_probs_done = True
        elif plan.stored != "u":  # forward KL, logit: out holds q's weights
            p = norm.probs("u")
            out.mul_(to_probs[rows] * -k).add_(p, alpha=k)
            if spec.need_ce and tau == 1.0:
                out.addcmul_(p, ce_row_weight)
                ce_probs_done = True
        else:  # out holds p's weights
            out.mul_(to_probs[rows])
            ce_here = spec.need_ce and tau == 1.0
            if spec.divergence == "forward_kl":
                q = norm.anchor_probs()
                out.mul_(k + ce_row_weight if ce_here else k).sub_(q, alpha=k)
            else:
                if spec.divergence == "reverse_kl":
                    shift = norm.logp("u") - norm.log_anchor()
                    shift.sub_(divergence_value[rows].unsqueeze(-1)).mul_(k)
                else:
                    shift = norm.logp("u") - norm.log_middle()
                    shift.sub_(kl_p_m[rows].unsqueeze(-1)).mul_(k * (1.0 - spec.jsd_beta))
                if ce_here:
                    shift.add_(ce_row_weight)
                out.mul_(shift)
            ce_probs_done = ce_here
        if spec.need_ce:
            if not ce_probs_done:
                out.addcmul_(norm.probs("z"), ce_row_weight)
            local_index, owned = _owned_label_index(sources["labels"][rows], layout, spec)
            out.scatter_add_(-1, local_index.unsqueeze(-1), owned.to(dtype).mul_(-w).unsqueeze(-1))
