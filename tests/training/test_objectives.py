"""The baseline objectives (``sft_kl``, ``distill``, ``dft``, ``asft``, ``taid``) through the
trainer's loss path (``iteration_loss`` -> ``masked_loss``) against their formulas, written
plainly here in float64: the masked loss sum, its gradient in closed form, and the
KL-to-reference metric. At TP=1 in this process (logits, and hidden states through the fused
output layer) and at TP=2 on two gloo ranks (each rank holds half of the padded vocabulary)."""

import pytest
import torch

from anchored_megatron.config import AnchorConfig

PADDED_VOCAB, VOCAB = 48, 45  # three padded columns, all on the second TP=2 shard
BATCH, SEQ = 3, 7
OBJECTIVES = {
    "sft_kl": AnchorConfig(objective="sft_kl", kl_weight=0.37),
    "distill": AnchorConfig(objective="distill", temperature=1.7, ce_weight=0.25),
    "distill_pure": AnchorConfig(objective="distill", temperature=0.6, ce_weight=0.0),
    "dft": AnchorConfig(objective="dft"),
    "asft": AnchorConfig(objective="asft", kl_weight=0.6),
    "taid": AnchorConfig(objective="taid", alpha=0.4, alpha_end=0.9),
}
# taid's t follows the optimizer step: step 3 of 10 on a line from 0.4 to 0.9.
STEP, TOTAL_STEPS, TAID_T = 3, 10, 0.4 + (0.9 - 0.4) * 3 / 9
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
    p, p_label = log_p1.exp(), (onehot * log_p1).sum(-1).exp()
    kl = torch.full_like(cross_entropy, float("nan"))  # no reference: the metric is undefined
    if anchor.objective in ("sft_kl", "asft"):
        # sft_kl: CE + lambda KL(p_base || p_theta); d/dz = (p - onehot) + lambda (p - p_base).
        # asft: the CE weighted by the label's probability, held constant (dft), + the same KL.
        lam = anchor.kl_weight
        log_pr = _log_softmax(r)
        kl = (log_pr.exp() * (log_pr - log_p1)).sum(-1)
        weight = p_label if anchor.objective == "asft" else torch.ones_like(p_label)
        per_token = weight * cross_entropy + lam * kl
        grad = weight.unsqueeze(-1) * (p - onehot) + lam * (p - log_pr.exp())
    elif anchor.objective == "dft":
        # -sg(p(y)) log p(y); d/dz = p(y) (p - onehot).
        per_token = p_label * cross_entropy
        grad = p_label.unsqueeze(-1) * (p - onehot)
    elif anchor.objective == "taid":
        # KL(q || p_theta) with q = softmax((1 - t) sg(z) + t r); d/dz = p - q.
        log_q = _log_softmax((1 - TAID_T) * z + TAID_T * r)
        log_pr = _log_softmax(r)
        kl = (log_pr.exp() * (log_pr - log_p1)).sum(-1)
        per_token = (log_q.exp() * (log_q - log_p1)).sum(-1)
        grad = p - log_q.exp()
    else:
        # (1 - w) tau^2 KL(p_teacher^tau || p_theta^tau) + w CE; d/dz = (1 - w) tau (p^tau - p_teacher^tau) + w (p - onehot).
        tau, w = anchor.temperature, anchor.ce_weight
        log_pt, log_pr = _log_softmax(z / tau), _log_softmax(r / tau)
        kl = (log_pr.exp() * (log_pr - log_pt)).sum(-1)
        per_token = (1 - w) * tau**2 * kl + w * cross_entropy
        grad = (1 - w) * tau * (log_pt.exp() - log_pr.exp()) + w * (p - onehot)
    full_grad = torch.zeros_like(student)
    full_grad[..., :VOCAB] = grad * loss_mask.unsqueeze(-1)
    return (per_token * loss_mask).sum(), full_grad, (kl * loss_mask).sum()


def _trainer_loss(name, student, reference, labels, loss_mask):
    """What the trainer computes for one microbatch: (loss_sum, grad w.r.t. the student logits, sums)."""
    from anchored_megatron.training.forward_step import masked_loss
    from anchored_megatron.training.objectives import iteration_loss

    leaf = student.clone().requires_grad_(True)
    batch = {"labels": labels, "loss_mask": loss_mask}
    terms = iteration_loss(OBJECTIVES[name], 0, STEP, TOTAL_STEPS)
    loss_sum, sums = masked_loss(leaf, [reference], batch, terms, VOCAB)
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
    if not OBJECTIVES[name].needs_reference:
        assert torch.isnan(sums[SUM_NAMES.index("kl_reference")]), "an objective without a reference reports no KL to it"
        errors["kl_reference"] = 0.0
    return errors


@pytest.mark.parametrize("name", ["sft_kl", "dft", "asft", "taid"])
def test_fused_output_objective_matches_the_formula(name):
    """The fused output layer's form of the trainer's loss (logits = hidden @ W^T never exist
    whole): loss, and the gradients w.r.t. hidden and W from the logits' by the chain rule."""
    from anchored_megatron.training.forward_step import SUM_NAMES, masked_loss
    from anchored_megatron.training.objectives import iteration_loss
    from anchored_megatron.training.roles import FusedOutput

    _, _, labels, loss_mask = _inputs()
    g = torch.Generator().manual_seed(11)
    hidden = [torch.randn(BATCH, SEQ, 16, generator=g, dtype=torch.float64) for _ in range(2)]
    weights = [torch.randn(PADDED_VOCAB, 16, generator=g, dtype=torch.float64) * 0.7 for _ in range(2)]
    leaf_h, leaf_w = hidden[0].clone().requires_grad_(True), weights[0].clone().requires_grad_(True)
    fused = FusedOutput(weights=(leaf_w, weights[1]), chunk_tokens=5, sequence_parallel=False)
    terms = iteration_loss(OBJECTIVES[name], 0, STEP, TOTAL_STEPS)
    loss_sum, sums = masked_loss(leaf_h, [hidden[1]], {"labels": labels, "loss_mask": loss_mask}, terms, VOCAB, fused)
    loss_sum.backward()

    logits = [h @ w.t() for h, w in zip(hidden, weights)]
    expected_loss, grad_logits, expected_kl = _expected(name, logits[0], logits[1], labels, loss_mask)
    assert _relative_error(loss_sum.detach(), expected_loss) <= TOLERANCE
    assert _relative_error(leaf_h.grad, grad_logits @ weights[0]) <= TOLERANCE
    assert _relative_error(leaf_w.grad, torch.einsum("bsv,bsh->vh", grad_logits, hidden[0])) <= TOLERANCE
    if OBJECTIVES[name].needs_reference:
        assert _relative_error(sums[SUM_NAMES.index("kl_reference")].double(), expected_kl) <= 1e-6


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


@pytest.mark.parametrize("fused_output", [False, True])
def test_anchored_with_a_kl_term_to_the_base_matches_the_formula(fused_output):
    """anchored (snapshot, alpha 0.3) + 0.4 KL(p_base || p_theta): the base is the third frozen
    role; loss, gradient w.r.t. the logits (or hidden and W) and the KL-to-reference metric."""
    from anchored_megatron.training.forward_step import SUM_NAMES, masked_loss
    from anchored_megatron.training.objectives import iteration_loss
    from anchored_megatron.training.roles import FusedOutput

    anchor = AnchorConfig(objective="anchored", alpha=0.3, base_kl_weight=0.4)
    assert anchor.frozen_roles == ("reference", "snapshot", "base")
    _, _, labels, loss_mask = _inputs()
    g = torch.Generator().manual_seed(5)
    hidden = [torch.randn(BATCH, SEQ, 16, generator=g, dtype=torch.float64) for _ in range(4)]  # student, reference, snapshot, base
    weights = [torch.randn(PADDED_VOCAB, 16, generator=g, dtype=torch.float64) * 0.7 for _ in range(4)]
    logits = [h @ w.t() for h, w in zip(hidden, weights)]
    batch = {"labels": labels, "loss_mask": loss_mask}
    terms = iteration_loss(anchor, 0)
    if fused_output:
        leaf_h, leaf_w = hidden[0].clone().requires_grad_(True), weights[0].clone().requires_grad_(True)
        fused = FusedOutput(weights=(leaf_w, *weights[1:]), chunk_tokens=5, sequence_parallel=False)
        loss_sum, sums = masked_loss(leaf_h, hidden[1:], batch, terms, VOCAB, fused)
    else:
        leaf = logits[0].clone().requires_grad_(True)
        loss_sum, sums = masked_loss(leaf, logits[1:], batch, terms, VOCAB)
    loss_sum.backward()

    z, r, s, b = (x[..., :VOCAB] for x in logits)
    log_p, log_pr, log_pb = _log_softmax(z), _log_softmax(r), _log_softmax(b)
    log_q = _log_softmax(0.7 * s + 0.3 * r)
    per_token = (log_q.exp() * (log_q - log_p)).sum(-1) + 0.4 * (log_pb.exp() * (log_pb - log_p)).sum(-1)
    grad = torch.zeros_like(logits[0])
    grad[..., :VOCAB] = ((log_p.exp() - log_q.exp()) + 0.4 * (log_p.exp() - log_pb.exp())) * loss_mask.unsqueeze(-1)
    assert _relative_error(loss_sum.detach(), (per_token * loss_mask).sum()) <= TOLERANCE
    if fused_output:
        assert _relative_error(leaf_h.grad, grad @ weights[0]) <= TOLERANCE
        assert _relative_error(leaf_w.grad, torch.einsum("bsv,bsh->vh", grad, hidden[0])) <= TOLERANCE
    else:
        assert _relative_error(leaf.grad, grad) <= TOLERANCE
    kl_reference = ((log_pr.exp() * (log_pr - log_p)).sum(-1) * loss_mask).sum()
    assert _relative_error(sums[SUM_NAMES.index("kl_reference")].double(), kl_reference) <= 1e-6


@pytest.mark.parametrize("objective", ["sft", "anchored"])
def test_replay_microbatch_loss_matches_the_formula(objective):
    """A replay microbatch: for anchored (snapshot) KL(p_snapshot || p_theta), for sft (rehearsal)
    the CE on the replay responses; its sums go to the replay metrics, none to the gold ones."""
    from anchored_megatron.training.forward_step import REPLAY_KEY, _loss_func
    from anchored_megatron.training.objectives import iteration_loss

    student, snapshot, labels, loss_mask = _inputs()
    anchor = AnchorConfig(objective=objective, alpha=0.3, temperature=1.5) if objective == "anchored" else AnchorConfig(objective="sft")
    teacher = torch.randn_like(student)  # never read: a replay microbatch has no teacher
    leaf = student.clone().requires_grad_(True)
    frozen = [teacher, snapshot] if objective == "anchored" else []
    batch = {"labels": labels, "loss_mask": loss_mask, REPLAY_KEY: True}
    loss_sum, tokens, report = _loss_func(batch, frozen, iteration_loss(anchor, 0), VOCAB, None, leaf)
    loss_sum.backward()

    log_p = _log_softmax(student[..., :VOCAB])
    if objective == "anchored":  # temperature 1 and alpha 0 whatever the gold loss uses; d/dz = p - p_snapshot
        log_s = _log_softmax(snapshot[..., :VOCAB])
        per_token = (log_s.exp() * (log_s - log_p)).sum(-1)
        grad = log_p.exp() - log_s.exp()
    else:  # CE; d/dz = p - onehot
        onehot = torch.nn.functional.one_hot(labels, VOCAB).double()
        per_token = -(onehot * log_p).sum(-1)
        grad = log_p.exp() - onehot
    expected_grad = torch.zeros_like(student)
    expected_grad[..., :VOCAB] = grad * loss_mask.unsqueeze(-1)
    expected_loss = (per_token * loss_mask).sum()
    assert _relative_error(loss_sum.detach(), expected_loss) <= TOLERANCE
    assert _relative_error(leaf.grad, expected_grad) <= TOLERANCE
    assert tokens.item() == loss_mask.sum().item()
    assert torch.count_nonzero(report["sums"]) == 0
    assert report["replay_sums"][0].item() == pytest.approx(expected_loss.item(), rel=1e-6)
    assert report["replay_sums"][1].item() == loss_mask.sum().item()
