"""Float64, full-vocabulary reference of the anchored loss, written plainly from the definitions.

Independent of anchored_megatron.anchor: it slices off the padded columns, builds p, q
(and m) as explicit distributions and sums the divergences term by term; the gradient
comes from autograd through these formulas.
"""

import torch
import torch.nn.functional as F


def kl(p_log, q_log):
    """KL(P || Q) from log-probabilities, summed over the last dim."""
    return (p_log.exp() * (p_log - q_log)).sum(-1)


def reference_loss(student, reference, anchor, *, alpha, interpolation="logit", divergence="forward_kl", jsd_beta=0.5,
                   temperature=1.0, labels=None, ce_weight=0.0, ignore_index=-100, vocab_size=None):
    """Returns (per-token loss, metrics dict) in float64; ``student`` may require grad."""
    vocab_size = vocab_size or student.shape[-1]
    z_theta = student[..., :vocab_size].double()
    z_ref = reference[..., :vocab_size].double()
    z_snap = z_theta.detach() if anchor is None else anchor[..., :vocab_size].double()
    tau = temperature
    log_p = F.log_softmax(z_theta / tau, dim=-1)
    log_p_snap = F.log_softmax(z_snap / tau, dim=-1)
    log_p_ref = F.log_softmax(z_ref / tau, dim=-1)
    if interpolation == "logit":
        log_q = F.log_softmax(((1 - alpha) * z_snap + alpha * z_ref) / tau, dim=-1)
    else:
        log_q = torch.log((1 - alpha) * log_p_snap.exp() + alpha * log_p_ref.exp())
    if divergence == "forward_kl":
        value = kl(log_q, log_p)
    elif divergence == "reverse_kl":
        value = kl(log_p, log_q)
    else:
        log_m = torch.log(jsd_beta * log_q.exp() + (1 - jsd_beta) * log_p.exp())
        value = jsd_beta * kl(log_q, log_m) + (1 - jsd_beta) * kl(log_p, log_m)
    loss = (1 - ce_weight) * tau**2 * value
    if ce_weight > 0:
        log_p1 = F.log_softmax(z_theta, dim=-1)
        kept = labels != ignore_index
        picked = log_p1.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        loss = loss + ce_weight * torch.where(kept, -picked, torch.zeros_like(picked))
    with torch.no_grad():
        if interpolation == "logit":
            bound = alpha * (kl(log_p_ref, log_p_snap) + kl(log_p_snap, log_p_ref))
        else:
            bound = alpha * kl(log_p_ref, log_p_snap)
        metrics = {
            "kl_step": kl(log_q, log_p_snap),
            "kl_bound": bound,
            "kl_reference": kl(log_p_ref, log_p),
            "entropy": -(log_p.exp() * log_p).sum(-1),
        }
    return loss, metrics


def reference_loss_and_grad(student, reference, anchor, **options):
    """(loss, d loss.sum() / d student over the padded width, metrics), all float64."""
    leaf = student.detach().double().requires_grad_(True)
    loss, metrics = reference_loss(leaf, reference, anchor, **options)
    (grad,) = torch.autograd.grad(loss.sum(), leaf)
    return loss.detach(), grad, metrics


def relative_error(actual, expected):
    """max |actual - expected| / max |expected| (max |expected| floored at 1e-12)."""
    actual, expected = actual.double(), expected.double()
    scale = expected.abs().max().clamp(min=1e-12)
    return ((actual - expected).abs().max() / scale).item()
