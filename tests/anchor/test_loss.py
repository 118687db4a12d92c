"""Single-process behaviour of vocab_parallel_anchored_loss (no process group: one rank)."""

import pytest
import torch
import torch.nn.functional as F

from anchored_megatron.anchor import vocab_parallel_anchored_loss
from tests.anchor.reference import kl, reference_loss, reference_loss_and_grad, relative_error


def _logits(*shape, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    scale = 2.0 + 3.0 * torch.rand(shape[:-1] + (1,), generator=generator, dtype=torch.float64)
    return (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(dtype)


def test_alpha_one_logit_interpolation_is_distillation_to_the_reference():
    student, reference, anchor = (_logits(6, 40, seed=s) for s in (1, 2, 3))
    leaf = student.clone().requires_grad_(True)
    loss = vocab_parallel_anchored_loss(leaf, reference, anchor, alpha=1.0)
    loss.sum().backward()
    # Plain distillation: KL(p_r || p_theta), and its gradient p_theta - p_r.
    expected = kl(F.log_softmax(reference, -1), F.log_softmax(student, -1))
    assert relative_error(loss, expected) <= 1e-12
    assert relative_error(leaf.grad, F.softmax(student, -1) - F.softmax(reference, -1)) <= 1e-12


@pytest.mark.parametrize("interpolation", ["logit", "prob"])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_alpha_zero_with_live_anchor_gives_zero_loss_and_zero_grad(interpolation, divergence):
    student, reference = _logits(2, 5, 48, seed=4, dtype=torch.float32), _logits(2, 5, 48, seed=5, dtype=torch.float32)
    leaf = student.clone().requires_grad_(True)
    loss = vocab_parallel_anchored_loss(leaf, reference, alpha=0.0, interpolation=interpolation, divergence=divergence,
                                        temperature=1.3, vocab_size=45)
    loss.sum().backward()
    assert loss.abs().max().item() <= 1e-6
    assert leaf.grad.abs().max().item() <= 1e-6


@pytest.mark.parametrize("interpolation", ["logit", "prob"])
@pytest.mark.parametrize("live", [True, False])
def test_kl_step_never_exceeds_kl_bound_on_10000_tokens(interpolation, live):
    student, reference, anchor = (_logits(10_000, 64, seed=s) for s in (6, 7, 8))
    for alpha in (0.05, 0.5, 0.95):
        _, metrics = vocab_parallel_anchored_loss(student, reference, None if live else anchor, alpha=alpha,
                                                  interpolation=interpolation, vocab_size=60, return_metrics=True)
        assert (metrics["kl_step"] <= metrics["kl_bound"] + 1e-12).all()
        assert metrics["kl_step"].max() > 1e-3  # not vacuous


def test_metrics_match_the_reference_and_carry_no_grad():
    student, reference, anchor = (_logits(3, 7, 40, seed=s) for s in (9, 10, 11))
    leaf = student.clone().requires_grad_(True)
    _, metrics = vocab_parallel_anchored_loss(leaf, reference, anchor, alpha=0.4, temperature=2.0, vocab_size=33,
                                              return_metrics=True)
    _, expected = reference_loss(student, reference, anchor, alpha=0.4, temperature=2.0, vocab_size=33)
    for name, value in expected.items():
        assert relative_error(metrics[name], value) <= 1e-10, name
        assert not metrics[name].requires_grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_inputs_are_unchanged_and_only_the_student_gets_a_grad(dtype):
    student, reference, anchor = (_logits(4, 32, seed=s, dtype=dtype) for s in (12, 13, 14))
    labels = torch.tensor([3, -100, 7, 29])
    copies = [x.clone() for x in (student, reference, anchor, labels)]
    leaf = student.clone().requires_grad_(True)
    reference.requires_grad_(True)
    anchor.requires_grad_(True)
    for divergence in ("forward_kl", "reverse_kl", "jsd"):
        loss = vocab_parallel_anchored_loss(leaf, reference, anchor, alpha=0.5, divergence=divergence,
                                            labels=labels, ce_weight=0.3, vocab_size=30)
        loss.sum().backward()
    assert loss.dtype == torch.float32
    assert leaf.grad.dtype == dtype and leaf.grad[:, 30:].abs().max() == 0
    assert reference.grad is None and anchor.grad is None
    for before, after in zip(copies, (leaf, reference, anchor, labels)):
        assert torch.equal(before, after.detach())


def test_fp32_and_bf16_inputs_follow_the_float64_reference():
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        student, reference, anchor = (_logits(3, 6, 50, seed=s, dtype=dtype) for s in (15, 16, 17))
        leaf = student.clone().requires_grad_(True)
        loss = vocab_parallel_anchored_loss(leaf, reference, anchor, alpha=0.5, interpolation="prob", vocab_size=47)
        loss.sum().backward()
        expected_loss, expected_grad, _ = reference_loss_and_grad(student, reference, anchor, alpha=0.5,
                                                                  interpolation="prob", vocab_size=47)
        assert relative_error(loss, expected_loss) <= tolerance
        assert relative_error(leaf.grad, expected_grad) <= tolerance


def test_chunked_path_equals_one_chunk():
    student, reference = _logits(37, 50, seed=18), _logits(37, 50, seed=19)
    labels = torch.randint(0, 50, (37,), generator=torch.Generator().manual_seed(0))
    results = []
    for chunk_tokens in (None, 1, 5, 64):
        leaf = student.clone().requires_grad_(True)
        loss = vocab_parallel_anchored_loss(leaf, reference, alpha=0.3, divergence="jsd", labels=labels, ce_weight=0.2,
                                            chunk_tokens=chunk_tokens)
        loss.sum().backward()
        results.append((loss.detach(), leaf.grad))
    for loss, grad in results[1:]:
        assert relative_error(loss, results[0][0]) <= 1e-13 and relative_error(grad, results[0][1]) <= 1e-13


def test_no_grad_call_returns_the_same_loss():
    student, reference = _logits(5, 30, seed=20), _logits(5, 30, seed=21)
    with torch.no_grad():
        loss = vocab_parallel_anchored_loss(student, reference, alpha=0.5, divergence="reverse_kl")
    expected, _ = reference_loss(student, reference, None, alpha=0.5, divergence="reverse_kl")
    assert relative_error(loss, expected) <= 1e-12


def test_second_backward_on_one_call_raises():
    leaf = _logits(2, 16, seed=22).requires_grad_(True)
    loss = vocab_parallel_anchored_loss(leaf, _logits(2, 16, seed=23), alpha=0.5).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def _call(**overrides):
    student = _logits(2, 3, 16, seed=24)
    arguments = dict(student_logits=student, reference_logits=student.clone(), alpha=0.5)
    arguments.update(overrides)
    return vocab_parallel_anchored_loss(**arguments)


@pytest.mark.parametrize("overrides, message", [
    (dict(alpha=1.5), "alpha must be a number in \\[0, 1\\], got 1.5"),
    (dict(alpha=-0.1), "alpha"),
    (dict(interpolation="geometric"), "interpolation must be one of .* got 'geometric'"),
    (dict(divergence="tv"), "divergence must be one of .* got 'tv'"),
    (dict(jsd_beta=2.0), "jsd_beta"),
    (dict(temperature=0.0), "temperature must be a number > 0, got 0.0"),
    (dict(ce_weight=1.2, labels=torch.zeros(2, 3, dtype=torch.long)), "ce_weight"),
    (dict(ce_weight=0.5), "labels are required"),
    (dict(reference_logits=torch.zeros(2, 3, 15, dtype=torch.float64)), "reference_logits shape \\(2, 3, 15\\)"),
    (dict(anchor_logits=torch.zeros(2, 4, 16, dtype=torch.float64)), "anchor_logits shape \\(2, 4, 16\\)"),
    (dict(labels=torch.zeros(2, 4, dtype=torch.long), ce_weight=0.5), "labels shape \\(2, 4\\)"),
    (dict(labels=torch.tensor([[0, 1, 14]]).expand(2, 3), vocab_size=14, ce_weight=0.5), "labels must be in \\[0, vocab_size=14\\).* got 14"),
    (dict(labels=torch.tensor([[0, -1, 3]]).expand(2, 3), ce_weight=0.5), "got -1"),
    (dict(vocab_size=17), "vocab_size must be .* padded vocabulary 16.* got 17"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(chunk_tokens=0), "chunk_tokens"),
])
def test_bad_input_raises_value_error_naming_the_argument(overrides, message):
    with pytest.raises(ValueError, match=message):
        _call(**overrides)
