"""The ``sft_kl`` and ``distill`` objectives through the trainer's loss path (``iteration_loss`` ->
``masked_loss``) against their formulas, written plainly here in float64: the masked loss sum,
its gradient in closed form, and the KL-to-reference metric. At TP=1 in this process and at
TP=2 on two gloo ranks (each rank holds half of the padded vocabulary)."""

import pytest
import torch

from anchored_megatron.config import AnchorConfig

PADDED_VOCAB, VOCAB = 48, 45  # three padded columns, all on the second TP=2 shard
BATCH, SEQ = 3, 7
OBJECTIVES = {
    "sft_kl": AnchorConfig(objective="sft_kl", kl_weight=0.37),
    "distill": AnchorConfig(objective="distill", temperature=1.7, ce_weight=0.25),
    "distill_pure": AnchorConfig(objective="distill", temperature=0.6, ce_weight=0.0),
}
TOLERANCE = 1e-12  # float64 end to end


def _inputs():
    g = torch.Generator().manual_seed(3)
    scale = 1.0 + 3.0 * torch.rand(BATCH, SEQ, 1, generator=g, dtype=torch.float64)
    student = torch.randn(BATCH, SEQ, PADDED_VOCAB, generator=g, dtype=torch.float64) * scale
    reference = torch.randn(BATCH, SEQ, PADDED_VOCAB, generator=g, dtype=torch.float64) * scale
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    loss_mask = (torch.rand(BATCH, SEQ, generator=g) < 0.6).double()
    return student, reference, labels, loss_mask


def _log_softmax(z):
    """log p_i = z_i - log sum_j exp(z_j), shifted by the max for range."""
    shifted = z - z.max(dim=-1, keepdim=True).values
    return shifted - shifted.exp().sum(dim=-1, keepdim=True).log()


def _expected(name, student, reference, labels, loss_mask):
    """(masked loss sum, d(loss sum)/d(student logits) over the padded width, masked KL(p_r || p_theta) sum)."""
    anchor = OBJECTIVES[name]
    z, r = student[..., :VOCAB], reference[..., :VOCAB]
    onehot = torch.nn.functional.one_hot(labels, VOCAB).double()
    log_p1 = _log_softmax(z)
    cross_entropy = -(onehot * log_p1).sum(-1)
    if anchor.objective == "sft_kl":
        # CE + lambda KL(p_base || p_theta); d/dz = (p - onehot) + lambda (p - p_base).
        lam = anchor.kl_weight
        log_pr = _log_softmax(r)
        kl = (log_pr.exp() * (log_pr - log_p1)).sum(-1)
        per_token = cross_entropy + lam * kl
        grad = (log_p1.exp() - onehot) + lam * (log_p1.exp() - log_pr.exp())
    else:
        # (1 - w) tau^2 KL(p_teacher^tau || p_theta^tau) + w CE; d/dz = (1 - w) tau (p^tau - p_teacher^tau) + w (p - onehot).
        tau, w = anchor.temperature, anchor.ce_weight
        log_pt, log_pr = _log_softmax(z / tau), _log_softmax(r / tau)
        kl = (log_pr.exp() * (log_pr - log_pt)).sum(-1)
        per_token = (1 - w) * tau**2 * kl + w * cross_entropy
        grad = (1 - w) * tau * (log_pt.exp() - log_pr.exp()) + w * (log_p1.exp() - onehot)
    full_grad = torch.zeros_like(student)
    full_grad[..., :VOCAB] = grad * loss_mask.unsqueeze(-1)
    return (per_token * loss_mask).sum(), full_grad, (kl * loss_mask).sum()


def _trainer_loss(name, student, reference, labels, loss_mask):
    """What the trainer computes for one microbatch: (loss_sum, grad w.r.t. the student logits, sums)."""
    from anchored_megatron.training.forward_step import masked_loss
    from anchored_megatron.training.objectives import iteration_loss

    leaf = student.clone().requires_grad_(True)
    batch = {"labels": labels, "loss_mask": loss_mask}
    loss_sum, sums = masked_loss(leaf, [reference], batch, iteration_loss(OBJECTIVES[name], 0), VOCAB)
    loss_sum.backward()
    return loss_sum.detach(), leaf.grad, sums


def _relative_error(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def _check(name, loss_sum, grad, sums, inputs):
    from anchored_megatron.training.forward_step import SUM_NAMES

    expected_loss, expected_grad, expected_kl = _expected(name, *inputs)
    errors = {
        "loss": _relative_error(loss_sum, expected_loss),
        "grad": _relative_error(grad, expected_grad),
        "kl_reference": _relative_error(sums[SUM_NAMES.index("kl_reference")].double(), expected_kl),
    }
    assert sums[SUM_NAMES.index("tokens")].item() == inputs[3].sum().item()
    return errors


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_objective_loss_and_gradient_match_the_formula(name):
    inputs = _inputs()
    errors = _check(name, *_trainer_loss(name, *inputs), inputs)
    # The metric sums are packed as fp32 for the one all-reduce per step; loss and grad stay float64.
    assert errors["loss"] <= TOLERANCE and errors["grad"] <= TOLERANCE and errors["kl_reference"] <= 1e-6, errors


def trainer_loss_rank(tp):
    """This rank's vocabulary shard through the trainer's loss path, every objective."""
    from megatron.core import parallel_state

    from anchored_megatron.config import ParallelConfig
    from anchored_megatron.platform import initialize

    initialize(ParallelConfig(tp=tp))
    width = PADDED_VOCAB // tp
    columns = slice(parallel_state.get_tensor_model_parallel_rank() * width, (parallel_state.get_tensor_model_parallel_rank() + 1) * width)
    student, reference, labels, loss_mask = _inputs()
    return {name: _trainer_loss(name, student[..., columns], reference[..., columns], labels, loss_mask) for name in OBJECTIVES}


@pytest.mark.distributed
def test_objectives_at_tp2_match_the_formula(ranks):
    per_rank = ranks(trainer_loss_rank, 2, 2)
    inputs = _inputs()
    for name in OBJECTIVES:
        (loss_sum, grad, sums), (loss_other, grad_other, _) = per_rank[0][name], per_rank[1][name]
        assert torch.equal(loss_sum, loss_other)  # every TP rank holds the whole loss
        errors = _check(name, loss_sum, torch.cat([grad, grad_other], dim=-1), sums, inputs)
        assert errors["loss"] <= TOLERANCE and errors["grad"] <= TOLERANCE and errors["kl_reference"] <= 1e-6, (name, errors)
