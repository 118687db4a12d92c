"""The anchored loss at TP = 1, 2, 4 (gloo ranks, Megatron's TP group) against the float64
full-vocabulary reference. One launch per TP size runs every option combination; the
parent compares (ranks only compute)."""

import itertools

import pytest
import torch

from tests.anchor.reference import reference_loss_and_grad, relative_error

PADDED_VOCAB = 64  # divisible by 1, 2 and 4
TOKENS = (2, 5)
OPTION_GRID = list(itertools.product(
    ("logit", "prob"), ("forward_kl", "reverse_kl", "jsd"), (True, False), (1.0, 1.5), (0.0, 0.4),
))


def _case_inputs(index: int, dtype: torch.dtype):
    """Identical on every rank: padded logits of std 2-5, labels with one ignored token."""
    generator = torch.Generator().manual_seed(1000 + index)
    # Vocab 40 leaves TP rank 3 of 4 holding padding only; 50 leaves it 2 real columns.
    vocab_size = 50 if index % 2 == 0 else 40
    scale = 2.0 + 3.0 * torch.rand(TOKENS + (1,), generator=generator, dtype=torch.float64)
    logits = [torch.randn(TOKENS + (PADDED_VOCAB,), generator=generator, dtype=torch.float64) * scale for _ in range(3)]
    labels = torch.randint(0, vocab_size, TOKENS, generator=generator)
    labels[0, 1] = -100
    return [x.to(dtype) for x in logits], labels, vocab_size


def _options(index):
    interpolation, divergence, live, temperature, ce_weight = OPTION_GRID[index]
    return dict(alpha=0.35, interpolation=interpolation, divergence=divergence, jsd_beta=0.3, temperature=temperature,
                ce_weight=ce_weight, ignore_index=-100), live


def _rank_all_cases(tp: int):
    from anchored_megatron.anchor import vocab_parallel_anchored_loss
    from anchored_megatron.config import ParallelConfig
    from anchored_megatron.platform import initialize
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    initialize(ParallelConfig(tp=tp))
    rank = parallel_state.get_tensor_model_parallel_rank()
    width = PADDED_VOCAB // tp
    columns = slice(rank * width, (rank + 1) * width)
    results = []
    for dtype in (torch.float64, torch.bfloat16):
        for index in range(len(OPTION_GRID)):
            (student, reference, anchor), labels, vocab_size = _case_inputs(index, dtype)
            options, live = _options(index)
            local = [x[..., columns].clone() for x in (student, reference, anchor)]
            before = [x.clone() for x in local]
            for with_metrics, chunk_tokens in ((True, 3), (False, None)):
                leaf = local[0].clone().requires_grad_(True)
                out = vocab_parallel_anchored_loss(
                    leaf, local[1], None if live else local[2], labels=labels, vocab_size=vocab_size,
                    return_metrics=with_metrics, chunk_tokens=chunk_tokens, **options,
                )
                loss, metrics = out if with_metrics else (out, {})
                # A non-uniform upstream gradient checks that backward scales per token.
                upstream = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).view_as(loss)
                (loss * upstream).sum().backward()
                results.append(dict(
                    dtype=dtype, index=index, with_metrics=with_metrics, loss=loss.detach(), grad=leaf.grad,
                    upstream=upstream, metrics={k: v.detach() for k, v in metrics.items()},
                    unchanged=all(torch.equal(a, b) for a, b in zip(local, before)),
                ))
    # ce_weight = 1 against Megatron's own vocab-parallel cross-entropy (padding included
    # in the softmax, as Megatron does), fp32.
    generator = torch.Generator().manual_seed(7)
    logits = torch.randn(3, 4, PADDED_VOCAB, generator=generator) * 4
    labels = torch.randint(0, PADDED_VOCAB, (3, 4), generator=generator)
    local = logits[..., columns].clone()
    ours_leaf = local.clone().requires_grad_(True)
    ours = vocab_parallel_anchored_loss(ours_leaf, local, alpha=0.5, labels=labels, ce_weight=1.0)
    ours.sum().backward()
    megatron_leaf = local.clone().requires_grad_(True)
    megatron = vocab_parallel_cross_entropy(megatron_leaf.clone(), labels)  # it overwrites its input
    megatron.sum().backward()
    megatron_check = dict(ours=ours.detach(), megatron=megatron.detach(), ours_grad=ours_leaf.grad, megatron_grad=megatron_leaf.grad)
    return dict(results=results, megatron=megatron_check)


def _check_tp(tp, per_rank):
    failures = []
    first = per_rank[0]["results"]
    for case_number, case in enumerate(first):
        dtype, index = case["dtype"], case["index"]
        (student, reference, anchor), labels, vocab_size = _case_inputs(index, dtype)
        options, live = _options(index)
        expected_loss, expected_grad, expected_metrics = reference_loss_and_grad(
            student, reference, None if live else anchor, labels=labels, vocab_size=vocab_size, **options)
        # backward of sum(loss * upstream) = upstream-weighted per-token gradients
        leaf = student.detach().double().requires_grad_(True)
        from tests.anchor.reference import reference_loss
        weighted, _ = reference_loss(leaf, reference, None if live else anchor, labels=labels, vocab_size=vocab_size, **options)
        (expected_grad,) = torch.autograd.grad((weighted * case["upstream"].double()).sum(), leaf)
        grad = torch.cat([r["results"][case_number]["grad"] for r in per_rank], dim=-1)
        tolerance = 1e-12 if dtype == torch.float64 else 1e-2  # float64: observed <= 9e-15 at TP 1, 2, 4
        errors = {"loss": relative_error(case["loss"], expected_loss), "grad": relative_error(grad, expected_grad)}
        for name, value in case["metrics"].items():
            errors[name] = relative_error(value, expected_metrics[name])
        for r in per_rank:
            errors["rank_agreement"] = max(errors.get("rank_agreement", 0.0), relative_error(r["results"][case_number]["loss"], case["loss"]))
        bad = {k: v for k, v in errors.items() if not v <= tolerance}
        if bad or not all(r["results"][case_number]["unchanged"] for r in per_rank):
            failures.append(f"tp={tp} {dtype} {OPTION_GRID[index]} metrics={case['with_metrics']}: {bad} "
                            f"inputs unchanged={[r['results'][case_number]['unchanged'] for r in per_rank]}")
    assert not failures, "\n".join(failures[:20])

    megatron = [r["megatron"] for r in per_rank]
    assert relative_error(megatron[0]["ours"], megatron[0]["megatron"]) <= 1e-6
    ours_grad = torch.cat([m["ours_grad"] for m in megatron], dim=-1)
    megatron_grad = torch.cat([m["megatron_grad"] for m in megatron], dim=-1)
    assert relative_error(ours_grad, megatron_grad) <= 1e-6


@pytest.mark.distributed
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_every_option_matches_float64_reference_and_megatron_ce(ranks, tp):
    per_rank = ranks(_rank_all_cases, tp, tp, timeout=600, env={"ANCHORED_FUSED_LOSS": "1"})  # the compiled kernels where they apply
    _check_tp(tp, per_rank)
