"""The compiled (fused) passes and the eager passes each follow the float64 reference on the
options the fused kernels cover; the default call really runs the compiled kernels."""

import warnings

import pytest
import torch

from anchored_megatron.anchor import fused_passes, vocab_parallel_anchored_loss
from tests.anchor.reference import reference_loss_and_grad, relative_error

# (live anchor, temperature, ce_weight, metrics, alpha): the fused path's options, tau=1 where CE is
# on; alpha 1 is distillation (q = the reference's softmax) and, with CE, SFT + KL.
COVERED = [(True, 1.0, 0.0, True, 0.4), (False, 1.0, 0.0, False, 0.4), (False, 1.7, 0.0, True, 0.4), (True, 1.0, 0.3, False, 0.4),
           (False, 1.0, 0.3, True, 0.4), (True, 1.0, 0.0, True, 1.0), (True, 2.0, 0.0, False, 1.0), (True, 1.0, 0.5, True, 1.0),
           (False, 1.0, 0.0, True, 1.0)]


def _logits(shape, seed, dtype):
    generator = torch.Generator().manual_seed(seed)
    scale = 2.0 + 3.0 * torch.rand(shape[:-1] + (1,), generator=generator, dtype=torch.float64)
    return (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(dtype)


def _run(monkeypatch, fused: bool, dtype, live, temperature, ce_weight, metrics, alpha, seed):
    monkeypatch.setenv("ANCHORED_FUSED_LOSS", "1" if fused else "0")
    shape = (3, 7, 45)  # 21 tokens in chunks of 4: a short last chunk
    student, reference, anchor = (_logits(shape, seed + i, dtype) for i in range(3))
    labels = torch.randint(0, 41, shape[:-1], generator=torch.Generator().manual_seed(seed))
    labels[0, 2] = -100
    options = dict(alpha=alpha, temperature=temperature, ce_weight=ce_weight)
    leaf = student.clone().requires_grad_(True)
    out = vocab_parallel_anchored_loss(leaf, reference, None if live else anchor, labels=labels, vocab_size=41,
                                       chunk_tokens=4, return_metrics=metrics, **options)
    loss, got_metrics = out if metrics else (out, {})
    upstream = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).view_as(loss)
    (loss * upstream).sum().backward()
    expected_loss, _, expected_metrics = reference_loss_and_grad(student, reference, None if live else anchor,
                                                                 labels=labels, vocab_size=41, **options)
    from tests.anchor.reference import reference_loss

    double = student.detach().double().requires_grad_(True)
    weighted, _ = reference_loss(double, reference, None if live else anchor, labels=labels, vocab_size=41, **options)
    (expected_grad,) = torch.autograd.grad((weighted * upstream.double()).sum(), double)
    errors = {"loss": relative_error(loss, expected_loss), "grad": relative_error(leaf.grad, expected_grad)}
    errors.update({name: relative_error(value, expected_metrics[name]) for name, value in got_metrics.items()})
    return errors


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_fused_and_eager_passes_follow_the_float64_reference(monkeypatch, fused, dtype, tolerance):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a compile fallback would warn: fail instead
        for case_number, case in enumerate(COVERED):
            errors = _run(monkeypatch, fused, dtype, *case, seed=10 * case_number)
            assert all(value <= tolerance for value in errors.values()), (case, errors)


def test_default_call_runs_the_compiled_kernels(monkeypatch):
    monkeypatch.delenv("ANCHORED_FUSED_LOSS", raising=False)
    calls = []
    original = fused_passes._kernel

    def counting(name):
        calls.append(name)
        return original(name)

    monkeypatch.setattr(fused_passes, "_kernel", counting)
    student = _logits((4, 30), 1, torch.float32).requires_grad_(True)
    vocab_parallel_anchored_loss(student, _logits((4, 30), 2, torch.float32), alpha=0.5).sum().backward()
    assert calls == ["stats", "gradient"]
    calls.clear()
    vocab_parallel_anchored_loss(student, _logits((4, 30), 2, torch.float32), alpha=1.0, temperature=2.0).sum().backward()
    assert calls == ["stats", "gradient"]  # distillation
    calls.clear()
    vocab_parallel_anchored_loss(student, _logits((4, 30), 2, torch.float32), alpha=0.5, divergence="jsd").sum().backward()
    assert calls == []  # not covered: the eager passes


def test_compile_failure_falls_back_to_eager_with_a_warning(monkeypatch):
    monkeypatch.delenv("ANCHORED_FUSED_LOSS", raising=False)
    monkeypatch.setattr(fused_passes, "_compile_failed", False)

    def broken(name):
        raise OSError("no C++ compiler")

    monkeypatch.setattr(fused_passes, "_kernel", broken)
    student, reference = _logits((5, 30), 3, torch.float64), _logits((5, 30), 4, torch.float64)
    leaf = student.clone().requires_grad_(True)
    with pytest.warns(RuntimeWarning, match="torch.compile failed"):
        loss = vocab_parallel_anchored_loss(leaf, reference, alpha=0.5)
    loss.sum().backward()
    expected_loss, expected_grad, _ = reference_loss_and_grad(student, reference, None, alpha=0.5)
    assert relative_error(loss, expected_loss) <= 1e-12 and relative_error(leaf.grad, expected_grad) <= 1e-12
    assert fused_passes._compile_failed
