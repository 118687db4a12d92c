"""The fused output layer + anchored loss against the float64 full-vocabulary reference: logits
made plainly as ``hidden @ W^T`` in float64, the loss from tests/anchor/reference.py, and the
gradients w.r.t. the hidden states and the output weight from autograd through both."""

import io
import itertools

import pytest
import torch

from anchored_megatron.anchor.fused_output import fused_output_anchored_loss
from anchored_megatron.anchor.vocab_passes import Workspace
from anchored_megatron.anchor import chunks as loss_chunks
from tests.live_bytes import LiveBytes
from tests.anchor.reference import reference_loss, relative_error

OPTION_GRID = list(itertools.product(("logit", "prob"), ("forward_kl", "reverse_kl", "jsd"), (True, False), (1.0, 1.5), (0.0, 0.4)))
BATCH, SEQ, HIDDEN, PADDED_VOCAB = 2, 8, 12, 64  # 16 tokens: chunks of 5 leave a short last one


def _inputs(seed: int, vocab_size: int, dtype=torch.float64):
    """Identical on every rank: hidden states and full (TP=1) weights of three roles, labels with
    an ignored token, a 0/1 loss mask."""
    g = torch.Generator().manual_seed(seed)
    hidden = [torch.randn(BATCH, SEQ, HIDDEN, generator=g, dtype=torch.float64) for _ in range(3)]
    weights = [torch.randn(PADDED_VOCAB, HIDDEN, generator=g, dtype=torch.float64) * 0.8 for _ in range(3)]
    labels = torch.randint(0, vocab_size, (BATCH, SEQ), generator=g)
    labels[0, 1] = -100
    mask = (torch.rand(BATCH, SEQ, generator=g) < 0.7).double()
    return [x.to(dtype) for x in hidden], [w.to(dtype) for w in weights], labels, mask


def _options(index):
    interpolation, divergence, live, temperature, ce_weight = OPTION_GRID[index]
    return dict(alpha=0.35, interpolation=interpolation, divergence=divergence, jsd_beta=0.3, temperature=temperature,
                ce_weight=ce_weight), live


def _expected(hidden, weights, labels, mask, options, live, vocab_size, scale, upstream=1.0):
    """(loss, d loss / d student hidden, d loss / d student weight, metric sums), float64."""
    h = hidden[0].detach().double().requires_grad_(True)
    w = weights[0].detach().double().requires_grad_(True)
    logits = [h @ w.t()] + [x.double() @ y.double().t() for x, y in zip(hidden[1:], weights[1:])]
    per_token, metrics = reference_loss(logits[0], logits[1], None if live else logits[2], labels=labels,
                                        vocab_size=vocab_size, **options)
    loss = scale * (per_token * mask.double()).sum()
    grad_h, grad_w = torch.autograd.grad(loss * upstream, (h, w))
    sums = {name: (value * mask.double()).sum() for name, value in metrics.items()}
    return loss.detach(), grad_h, grad_w, sums


def _fused(hidden, weights, labels, mask, options, live, vocab_size, scale, upstream=1.0, **call):
    h = hidden[0].clone().requires_grad_(True)
    w = weights[0].clone().requires_grad_(True)
    loss, sums = fused_output_anchored_loss(
        h, w, hidden[1], weights[1], None if live else hidden[2], None if live else weights[2], labels=labels, loss_mask=mask,
        loss_scale=scale, vocab_size=vocab_size, return_metrics=True, **options, **call)
    (loss * upstream).backward()
    return loss.detach(), h.grad, w.grad, sums


def _errors(got, expected):
    names = ("loss", "grad_hidden", "grad_weight")
    errors = {name: relative_error(a, b) for name, a, b in zip(names, got[:3], expected[:3])}
    errors.update({name: relative_error(got[3][name], value) for name, value in expected[3].items()})
    return errors


@pytest.mark.parametrize("compiled", [False, True])
def test_every_option_matches_the_float64_reference(monkeypatch, compiled):
    # The compiled kernels cover logit / forward KL (fused_passes.applies); the others run eager either way.
    monkeypatch.setenv("ANCHORED_FUSED_LOSS", "1" if compiled else "0")
    failures = []
    for index in range(len(OPTION_GRID)):
        if compiled and OPTION_GRID[index][:2] != ("logit", "forward_kl"):
            continue
        options, live = _options(index)
        hidden, weights, labels, mask = _inputs(index, vocab_size=50)
        before = [x.clone() for x in (*hidden, *weights, labels, mask)]
        got = _fused(hidden, weights, labels, mask, options, live, 50, 1.3, upstream=0.37, chunk_tokens=5)
        expected = _expected(hidden, weights, labels, mask, options, live, 50, 1.3, upstream=0.37)
        errors = _errors(got, expected)
        if max(errors.values()) > 1e-10:
            failures.append((OPTION_GRID[index], errors))
        if not all(torch.equal(a, b) for a, b in zip(before, (*hidden, *weights, labels, mask))):
            failures.append((OPTION_GRID[index], "an input was modified"))
    assert not failures, failures


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_low_precision_weights_follow_the_reference(monkeypatch, dtype, tolerance):
    # Logits come out of a GEMM in the weights' dtype, as from the unfused output layer; the
    # reference sees the same (rounded) inputs in float64. bf16: the weight gradient's chunk
    # products in blocks of 7 vocabulary rows (a short last block), summed in fp32.
    monkeypatch.setattr(loss_chunks, "WEIGHT_GRAD_BLOCK_BYTES", HIDDEN * 2 * 7)
    for index in (0, 9, 23):  # logit forward KL live; logit JSD; prob JSD snapshot, tau 1.5, CE
        options, live = _options(index)
        hidden, weights, labels, mask = _inputs(100 + index, vocab_size=50, dtype=dtype)
        got = _fused(hidden, weights, labels, mask, options, live, 50, 1.0)
        expected = _expected(hidden, weights, labels, mask, options, live, 50, 1.0)
        assert got[1].dtype == got[2].dtype == dtype
        errors = _errors(got, expected)
        assert max(errors.values()) <= tolerance, (dtype, OPTION_GRID[index], errors)


def test_plain_sft_needs_no_reference_and_matches_cross_entropy():
    hidden, weights, labels, mask = _inputs(7, vocab_size=50)
    h = hidden[0].clone().requires_grad_(True)
    loss = fused_output_anchored_loss(h, weights[0], alpha=1.0, ce_weight=1.0, labels=labels, loss_mask=mask, vocab_size=50, chunk_tokens=3)
    loss.backward()
    h2 = hidden[0].clone().requires_grad_(True)
    logits = (h2 @ weights[0].t())[..., :50]
    kept = (labels != -100).double() * mask
    per_token = torch.nn.functional.cross_entropy(logits.reshape(-1, 50), labels.clamp(min=0).reshape(-1), reduction="none")
    expected = (per_token * kept.reshape(-1)).sum()
    expected.backward()
    assert relative_error(loss, expected) <= 1e-12 and relative_error(h.grad, h2.grad) <= 1e-12


@pytest.mark.parametrize("compiled", [False, True])
def test_token_rows_compute_only_those_tokens_as_if_the_others_were_masked_out(monkeypatch, compiled):
    # The reference computes every token; token_rows equal to the nonzero mask changes nothing,
    # a subset of it zeroes the mask elsewhere, none at all gives a zero loss and gradients.
    monkeypatch.setenv("ANCHORED_FUSED_LOSS", "1" if compiled else "0")
    for index in (0, 9, 23):
        if compiled and OPTION_GRID[index][:2] != ("logit", "forward_kl"):
            continue
        options, live = _options(index)
        hidden, weights, labels, mask = _inputs(300 + index, vocab_size=50)
        flat = mask.reshape(-1)
        nonzero = flat.nonzero().squeeze(1)
        subset = nonzero[::2]
        subset_mask = torch.zeros_like(flat).index_fill_(0, subset, 1.0).view_as(mask) * mask
        for rows, expected_mask in ((nonzero, mask), (subset, subset_mask), (nonzero[:0], torch.zeros_like(mask))):
            got = _fused(hidden, weights, labels, mask, options, live, 50, 1.3, upstream=0.37, chunk_tokens=3, token_rows=rows)
            expected = _expected(hidden, weights, labels, expected_mask, options, live, 50, 1.3, upstream=0.37)
            errors = _errors(got, expected)
            assert max(errors.values()) <= 1e-10, (OPTION_GRID[index], rows.numel(), errors)
            dropped = torch.ones_like(flat, dtype=torch.bool).index_fill_(0, rows, False).view_as(mask)
            assert torch.all(got[1][dropped] == 0), "a token outside token_rows got a hidden-state gradient"


def test_weight_gradient_accumulates_over_calls_and_with_a_tied_embedding():
    # Two microbatches, and the output weight also used as an input embedding (tied): autograd
    # sums every contribution into .grad, which is what Megatron's DDP hook adds to main_grad.
    options, live = _options(0)
    tokens = torch.randint(0, 50, (BATCH, SEQ), generator=torch.Generator().manual_seed(3))
    results = []
    for fused in (True, False):
        hidden, weights, labels, mask = _inputs(11, vocab_size=50)
        embedding = weights[0].clone().requires_grad_(True)
        for micro in range(2):
            h = torch.tanh(embedding[tokens] + hidden[0] * (1 + micro))  # the "model" on the tied weight
            if fused:
                loss = fused_output_anchored_loss(h, embedding, hidden[1], weights[1], labels=labels, loss_mask=mask,
                                                  vocab_size=50, chunk_tokens=4, **options)
            else:
                per_token, _ = reference_loss(h @ embedding.t(), hidden[1] @ weights[1].t(), None, labels=labels, vocab_size=50, **options)
                loss = (per_token * mask).sum()
            loss.backward()
        results.append(embedding.grad)
    assert relative_error(results[0], results[1]) <= 1e-12


def test_backward_twice_raises():
    hidden, weights, labels, mask = _inputs(12, vocab_size=50)
    h = hidden[0].clone().requires_grad_(True)
    loss = fused_output_anchored_loss(h, weights[0], hidden[1], weights[1], alpha=0.5, loss_mask=mask)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def _call(**overrides):
    hidden, weights, labels, mask = _inputs(13, vocab_size=50)
    arguments = dict(student_hidden=hidden[0], student_weight=weights[0], reference_hidden=hidden[1], reference_weight=weights[1],
                     alpha=0.5, loss_mask=mask, labels=labels, ce_weight=0.2)
    arguments.update(overrides)
    return fused_output_anchored_loss(**arguments)


@pytest.mark.parametrize("overrides, message", [
    (dict(reference_hidden=None, reference_weight=None), "reference_hidden and reference_weight are required unless ce_weight = 1"),
    (dict(reference_weight=None), "reference_hidden and reference_weight go together, got only reference_hidden"),
    (dict(anchor_hidden=torch.zeros(BATCH, SEQ, HIDDEN, dtype=torch.float64)), "anchor_hidden and anchor_weight go together"),
    (dict(reference_hidden=torch.zeros(BATCH, SEQ + 1, HIDDEN, dtype=torch.float64)), "reference_hidden shape \\(2, 9, 12\\) does not match"),
    (dict(reference_weight=torch.zeros(PADDED_VOCAB, HIDDEN + 1, dtype=torch.float64)), "reference_weight shape \\(64, 13\\) does not match"),
    (dict(student_weight=torch.zeros(PADDED_VOCAB, HIDDEN + 1, dtype=torch.float64),
          reference_weight=torch.zeros(PADDED_VOCAB, HIDDEN + 1, dtype=torch.float64)), "student_hidden shape .* hidden size 13"),
    (dict(labels=torch.zeros(BATCH, SEQ - 1, dtype=torch.long)), "labels shape \\(2, 7\\) does not match the hidden states' tokens \\(2, 8\\)"),
    (dict(loss_mask=torch.ones(BATCH)), "loss_mask shape \\(2,\\)"),
    (dict(labels=torch.zeros(BATCH, SEQ)), "labels must be an integer tensor"),
    (dict(loss_scale=0.0), "loss_scale must be a number > 0, got 0.0"),
    (dict(alpha=1.5), "alpha must be a number in \\[0, 1\\], got 1.5"),
    (dict(vocab_size=65), "vocab_size must be .* padded vocabulary 64.* got 65"),
    (dict(chunk_tokens=0), "chunk_tokens must be an integer >= 1 or None, got 0"),
    (dict(labels=torch.full((BATCH, SEQ), 50), vocab_size=50), "labels must be in \\[0, vocab_size=50\\).* got 50"),
    (dict(token_rows=torch.tensor([0, 3], dtype=torch.int32)), "token_rows must be a 1-D int64 tensor of token indices, got torch.int32"),
    (dict(token_rows=torch.zeros(2, 2, dtype=torch.long)), "token_rows must be a 1-D int64 tensor .* \\(2, 2\\)"),
    (dict(token_rows=torch.arange(BATCH * SEQ + 1)), "token_rows has 17 indices for 16 tokens"),
])
def test_bad_input_raises_value_error_naming_the_argument(overrides, message):
    with pytest.raises(ValueError, match=message):
        _call(**overrides)


def test_eager_scratch_stays_within_the_planned_buffers(monkeypatch):
    # The memory budget assumes at most EAGER_SCRATCH_BUFFERS workspace buffers: count them for
    # every option, bf16 logits (converted copies) and metrics on.
    counts = []
    original = Workspace.get

    def counting_get(self, key, n):
        buffer = original(self, key, n)
        counts.append(len(self._buffers))
        return buffer

    monkeypatch.setattr(Workspace, "get", counting_get)
    monkeypatch.setenv("ANCHORED_FUSED_LOSS", "0")
    for index in range(len(OPTION_GRID)):
        options, live = _options(index)
        hidden, weights, labels, mask = _inputs(index, vocab_size=50, dtype=torch.bfloat16)
        _fused(hidden, weights, labels, mask, options, live, 50, 1.0)
    assert 0 < max(counts) <= loss_chunks.EAGER_SCRATCH_BUFFERS


def _peak_bytes(seq: int, vocab: int, chunk_tokens):
    g = torch.Generator().manual_seed(0)
    hidden = [torch.randn(1, seq, HIDDEN, generator=g) for _ in range(3)]
    weights = [torch.randn(vocab, HIDDEN, generator=g) for _ in range(3)]
    h = hidden[0].requires_grad_(True)
    w = weights[0].requires_grad_(True)
    with LiveBytes() as meter:
        loss = fused_output_anchored_loss(h, w, hidden[1], weights[1], hidden[2], weights[2], alpha=0.5, chunk_tokens=chunk_tokens)
        loss.backward()
    return meter.peak


def test_peak_memory_does_not_grow_with_the_sequence(monkeypatch):
    monkeypatch.setenv("ANCHORED_FUSED_LOSS", "0")  # compiled graphs allocate outside the dispatch mode
    vocab, chunk = 2048, 16
    short, long = _peak_bytes(128, vocab, chunk), _peak_bytes(1024, vocab, chunk)
    # What grows with the sequence is O(tokens x hidden) (hidden states, their gradient), not
    # O(tokens x vocab): 896 more tokens would add 7 MiB per [tokens, V] fp32 tensor.
    assert long - short <= 896 * HIDDEN * 4 * 8, (short, long)
    # The unfused path holds four such tensors (three roles' logits and the gradient).
    assert long < 1024 * vocab * 4, long


def test_auto_chunk_fills_the_budget_whatever_the_sequence():
    per_token = loss_chunks.bytes_per_token(64128, 3, 2, compiled=True)
    chunk = loss_chunks.auto_chunk_tokens(64128, 3, 2, compiled=True)
    assert chunk * per_token <= loss_chunks.CHUNK_BUDGET_BYTES < (chunk + 1) * per_token
    assert loss_chunks.auto_chunk_tokens(10**9, 3, 4, compiled=False) == 1


# (options, live anchor, weights dtype): plain SFT, distillation, the anchored loss on the eager
# passes (prob interpolation) with a snapshot, and the compiled-kernel case run eagerly in bf16.
AUTO_CHUNK_CASES = [
    (dict(alpha=0.0, ce_weight=1.0), True, torch.float32, False),
    (dict(alpha=1.0), True, torch.float32, True),
    (dict(alpha=0.5, interpolation="prob"), False, torch.float32, True),
    (dict(alpha=0.5), False, torch.bfloat16, True),
]


@pytest.mark.parametrize("options, live, dtype, with_reference", AUTO_CHUNK_CASES)
def test_auto_chunks_sized_by_the_calls_own_buffers_keep_the_temporaries_within_the_budget(monkeypatch, options, live, dtype, with_reference):
    """Chunks are sized by the buffers a call's options take, not the widest set's: the measured
    peak beyond what any chunking holds (the fp32 weight gradient, the hidden-state gradient)
    stays within the budget, and the chunks are larger than the widest set's would be."""
    monkeypatch.setenv("ANCHORED_FUSED_LOSS", "0")
    budget, vocab, hidden_size, seq = 4 * 2**20, 4096, 16, 1024
    monkeypatch.setattr(loss_chunks, "CHUNK_BUDGET_BYTES", budget)
    g = torch.Generator().manual_seed(0)
    hidden = [torch.randn(1, seq, hidden_size, generator=g).to(dtype) for _ in range(3)]
    weights = [(torch.randn(vocab, hidden_size, generator=g) * 0.3).to(dtype) for _ in range(3)]
    labels = torch.randint(0, vocab, (1, seq), generator=g)
    h, w = hidden[0].clone().requires_grad_(True), weights[0].clone().requires_grad_(True)
    roles = [(hidden[1], weights[1]) if with_reference else (None, None), (None, None) if live else (hidden[2], weights[2])]
    chunk_sizes = []
    original = Workspace.__init__

    def recording_init(self, rows, cols, dtype, device):
        chunk_sizes.append(rows)
        original(self, rows, cols, dtype, device)

    monkeypatch.setattr(Workspace, "__init__", recording_init)
    with LiveBytes() as meter:
        loss = fused_output_anchored_loss(h, w, *roles[0], *roles[1], labels=labels, **options)
        loss.backward()
    outside_chunks = vocab * hidden_size * 4 + 2 * seq * hidden_size * 4 + vocab * hidden_size * w.element_size()
    assert meter.peak <= budget + outside_chunks + 2**16, (meter.peak, budget + outside_chunks)
    widest = loss_chunks.auto_chunk_tokens(vocab, 1 + with_reference + (not live), w.element_size(), compiled=False)
    assert chunk_sizes and chunk_sizes[-1] > widest, (chunk_sizes, widest)  # the last: the call's own, after the count


# ---- tensor parallel (and sequence parallel) over gloo ranks -----------------------------------
TP_CASES = [(0, False), (9, True), (17, False), (23, True)]  # (option index, sequence parallel)
TOKEN_ROWS_CASES = (9, 17)


def _rank_cases(tp: int, vocab_size: int):
    from megatron.core import parallel_state

    from anchored_megatron.config import ParallelConfig
    from anchored_megatron.platform import initialize

    initialize(ParallelConfig(tp=tp))
    rank = parallel_state.get_tensor_model_parallel_rank()
    rows = slice(rank * PADDED_VOCAB // tp, (rank + 1) * PADDED_VOCAB // tp)
    results = []
    for index, sequence_parallel in TP_CASES:
        options, live = _options(index)
        hidden, weights, labels, mask = _inputs(200 + index, vocab_size)
        local_weights = [w[rows].clone() for w in weights]
        if sequence_parallel:
            span = SEQ // tp
            local_hidden = [x[:, rank * span:(rank + 1) * span].clone() for x in hidden]
        else:
            local_hidden = hidden
        # Two cases compute only the masked-in tokens (all of them, so the reference is unchanged).
        token_rows = mask.reshape(-1).nonzero().squeeze(1) if index in TOKEN_ROWS_CASES else None
        got = _fused(local_hidden, local_weights, labels, mask, options, live, vocab_size, 0.9, upstream=1.7, chunk_tokens=5,
                     sequence_parallel=sequence_parallel, token_rows=token_rows)
        results.append(dict(loss=got[0], grad_hidden=got[1], grad_weight=got[2], sums={k: v.detach() for k, v in got[3].items()}))
    buffer = io.BytesIO()
    torch.save(results, buffer)
    return buffer.getvalue()


@pytest.mark.distributed
@pytest.mark.parametrize("tp, vocab_size", [(2, 50), (4, 40)])  # vocab 40 of 64 at TP=4: rank 3 holds padding only
def test_tensor_and_sequence_parallel_match_the_float64_reference(ranks, tp, vocab_size):
    per_rank = [torch.load(io.BytesIO(blob)) for blob in ranks(_rank_cases, tp, tp, vocab_size, timeout=600)]
    failures = []
    for number, (index, sequence_parallel) in enumerate(TP_CASES):
        options, live = _options(index)
        hidden, weights, labels, mask = _inputs(200 + index, vocab_size)
        expected = _expected(hidden, weights, labels, mask, options, live, vocab_size, 0.9, upstream=1.7)
        cases = [r[number] for r in per_rank]
        grad_weight = torch.cat([c["grad_weight"] for c in cases])
        if sequence_parallel:
            grad_hidden = torch.cat([c["grad_hidden"] for c in cases], dim=1)
        else:
            grad_hidden = cases[0]["grad_hidden"]
            assert all(torch.equal(c["grad_hidden"], grad_hidden) for c in cases)
        errors = _errors((cases[0]["loss"], grad_hidden, grad_weight, cases[0]["sums"]), expected)
        if max(errors.values()) > 1e-10:
            failures.append((tp, OPTION_GRID[index], sequence_parallel, errors))
    assert not failures, failures
