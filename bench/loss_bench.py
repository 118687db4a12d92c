"""Side-by-side cost of the anchored loss against Megatron's vocab-parallel cross-entropy.

Cases: 4096 tokens, V in {32000, 128256}, TP in {1, 2} (gloo ranks), fp32 and bf16 logits.
Methods, each timed forward + backward on the same inputs in the same process:
  (a) megatron  megatron.core.tensor_parallel.vocab_parallel_cross_entropy (on a copy:
                it overwrites fp32 logits in place)
  (b) live      vocab_parallel_anchored_loss, live anchor (student + reference logits)
  (c) snapshot  vocab_parallel_anchored_loss with snapshot anchor logits
  (d) naive     all-gather the full vocabulary, log_softmax, F.kl_div (live anchor)
  (e) live, eager  (b) with the compiled kernels switched off (ANCHORED_FUSED_LOSS=0): the
                fallback where torch.compile cannot run

Memory method: peak resident-set growth, measured on a call of its own after one warm-up
call (so compiled kernels are built and no compile-time memory counts). Before it the
process's RSS high-water mark is reset (write "5" to /proc/self/clear_refs) with every input
already built; the peak (VmHWM) minus the RSS at that moment is the method's extra memory,
gradient included. For that call glibc is told to serve every allocation >= 64 KiB by mmap
and to unmap it on free (mallopt M_MMAP_THRESHOLD / M_TRIM_THRESHOLD), so a later method
cannot hide in memory an earlier one left behind. Timed calls run with glibc's threshold at
32 MiB instead, the value its adaptive threshold reaches in a long-running process: with 64
KiB, every chunk-sized temporary would be a fresh mmap and page-faulted in again, a cost no
training process pays. At TP=2 the figures are the larger of the two ranks. tracemalloc is
useless here (torch allocates outside Python's allocator).

The naive method at V=128256 would need ~15 GB per rank at 4096 tokens on this shared
23 GB machine, so it runs on fewer tokens there (shown in the table) and its ratios are
taken against (a) re-run on those same tokens. Everything else uses 4096 tokens.
CPU time on this machine is shared with other jobs: times are the minimum of a few
repetitions, interleaved per case; treat ratios as +-20%.

Run: .venv/bin/python bench/loss_bench.py  (about 10 minutes on 2 shared cores)
"""

from __future__ import annotations

import ctypes
import datetime
import gc
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

TOKENS = int(os.environ.get("LOSS_BENCH_TOKENS", 4096))
VOCABS = tuple(int(v) for v in os.environ.get("LOSS_BENCH_VOCABS", "32000,128256").split(","))
TPS = (1, 2)
DTYPES = (torch.float32, torch.bfloat16)
ALPHA = 0.5
NAIVE_BUDGET_BYTES = 3 << 30  # per rank, for the naive method's ~7 full-vocab fp32 tensors


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _malloc_mode(measuring_memory: bool):
    """glibc settings for a memory rep (every block >= 64 KiB mmap'ed and unmapped on free,
    so the RSS peak is exact and nothing hides in a cache) or for a timed rep (blocks below
    32 MiB kept in the heap, where glibc's adaptive threshold ends up in a long-running
    process; larger ones, e.g. Megatron's full-shard tensors, mmap'ed as always)."""
    libc = ctypes.CDLL("libc.so.6")
    threshold = 64 * 1024 if measuring_memory else 32 << 20
    libc.mallopt(_M_MMAP_THRESHOLD, threshold)
    libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024 if measuring_memory else 64 << 20)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _measure(run, reps: int, barrier, leaf):
    """(min seconds over ``reps`` timed calls, the first one included, peak extra bytes of a
    separate call made after that first one: warm caches, compiled kernels, no compile memory).
    Every call starts with ``leaf.grad`` unset, so each one allocates its gradient (none
    accumulates into the previous call's)."""
    times, peak = [], None
    for rep in range(reps + 1):
        measuring_memory = rep == 1
        _malloc_mode(measuring_memory)
        leaf.grad = None
        gc.collect()
        barrier()
        if measuring_memory:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            base = _status_kib("VmRSS")
        start = time.perf_counter()
        keep = run()
        elapsed = time.perf_counter() - start
        if measuring_memory:
            peak = (_status_kib("VmHWM") - base) * 1024
        else:
            times.append(elapsed)
        del keep
        barrier()
    _malloc_mode(True)
    return min(times), peak


def _rank_bench(tp: int):
    import torch.nn.functional as F

    from anchored_megatron.anchor import vocab_parallel_anchored_loss
    from anchored_megatron.config import ParallelConfig
    from anchored_megatron.platform import initialize
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region, vocab_parallel_cross_entropy

    initialize(ParallelConfig(tp=tp))
    group = parallel_state.get_tensor_model_parallel_group()
    barrier = (lambda: torch.distributed.barrier(group=group)) if tp > 1 else (lambda: None)
    rank = parallel_state.get_tensor_model_parallel_rank()
    rows = []
    for vocab in VOCABS:
        local_vocab = vocab // tp
        reps = 3 if vocab <= 32000 else 2
        for dtype in DTYPES:
            def inputs(tokens, with_anchor=False):
                generator = torch.Generator().manual_seed(rank + 17 * tokens)
                make = lambda: (torch.randn(tokens, local_vocab, generator=generator) * 3).to(dtype)  # noqa: E731
                labels = torch.randint(0, vocab, (tokens,), generator=torch.Generator().manual_seed(tokens))
                return make(), make(), make() if with_anchor else None, labels

            def megatron(tokens):
                student, _, _, labels = inputs(tokens)
                leaf = student.clone().requires_grad_(True)
                copy = leaf.clone()  # Megatron overwrites fp32 inputs; the copy stays in the graph
                del student

                def run():
                    vocab_parallel_cross_entropy(copy, labels).sum().backward()
                    return leaf.grad
                return run, (leaf,)

            def ours(tokens, with_anchor, fused="1"):
                student, reference, anchor, _ = inputs(tokens, with_anchor)
                leaf = student.requires_grad_(True)

                def run():
                    os.environ["ANCHORED_FUSED_LOSS"] = fused
                    try:
                        vocab_parallel_anchored_loss(leaf, reference, anchor, alpha=ALPHA, vocab_size=vocab).sum().backward()
                    finally:
                        os.environ["ANCHORED_FUSED_LOSS"] = "1"
                    return leaf.grad
                return run, (leaf, reference, anchor)

            def naive(tokens):
                student, reference, _, _ = inputs(tokens)
                leaf = student.requires_grad_(True)

                def run():
                    leaf.grad = None
                    full = gather_from_tensor_model_parallel_region(leaf)[..., :vocab].float()
                    full_reference = gather_from_tensor_model_parallel_region(reference)[..., :vocab].float()
                    log_p = F.log_softmax(full, dim=-1)
                    log_q = F.log_softmax((1 - ALPHA) * full.detach() + ALPHA * full_reference, dim=-1)
                    F.kl_div(log_p, log_q, reduction="none", log_target=True).sum(-1).sum().backward()
                    return leaf.grad
                return run, (leaf, reference)

            naive_tokens = TOKENS
            while naive_tokens * vocab * 4 * 7 > NAIVE_BUDGET_BYTES:
                naive_tokens //= 2
            plan = [("a megatron", TOKENS, lambda: megatron(TOKENS)),
                    ("b live", TOKENS, lambda: ours(TOKENS, False)),
                    ("c snapshot", TOKENS, lambda: ours(TOKENS, True)),
                    ("e live, eager", TOKENS, lambda: ours(TOKENS, False, fused="0"))]
            if naive_tokens != TOKENS:
                plan.append(("a megatron", naive_tokens, lambda: megatron(naive_tokens)))
            plan.append(("d naive", naive_tokens, lambda: naive(naive_tokens)))
            for name, tokens, build in plan:
                run, holders = build()
                seconds, peak = _measure(run, reps, barrier, holders[0])
                del run, holders
                rows.append(dict(vocab=vocab, tp=tp, dtype=str(dtype).replace("torch.", ""), method=name,
                                 tokens=tokens, seconds=seconds, peak=peak, shard=tokens * local_vocab * 4))
                gc.collect()
    return rows


def _merge_ranks(per_rank):
    merged = []
    for rows in zip(*per_rank):
        row = dict(rows[0])
        row["seconds"] = max(r["seconds"] for r in rows)
        row["peak"] = max(r["peak"] for r in rows)
        merged.append(row)
    return merged


def main():
    from anchored_megatron.platform import run_on_ranks

    print(f"# loss_bench  {datetime.date.today().isoformat()}  torch {torch.__version__}  {os.cpu_count()} CPU cores (shared)")
    print(f"# {TOKENS} tokens, alpha={ALPHA}, forward+backward; time = min of repetitions; "
          "memory = peak RSS growth (max over TP ranks); shard = tokens x V/tp x 4 bytes")
    rows = []
    for tp in TPS:
        rows += _merge_ranks(run_on_ranks(_rank_bench, tp, tp, timeout=3000))
    header = f"{'V':>6} {'TP':>2} {'dtype':>8} {'method':<13} {'tokens':>6} {'time s':>7} {'x(a)':>5} {'peak MB':>8} {'x(a)':>5} {'extra-(a) in shards':>19}"
    print(header)
    print("-" * len(header))
    baseline = {}
    for row in rows:
        key = (row["vocab"], row["tp"], row["dtype"], row["tokens"])
        if row["method"].startswith("a "):
            baseline[key] = row
        base = baseline[key]
        excess = (row["peak"] - base["peak"]) / row["shard"]
        print(f"{row['vocab']:>6} {row['tp']:>2} {row['dtype']:>8} {row['method']:<13} {row['tokens']:>6} "
              f"{row['seconds']:>7.3f} {row['seconds'] / base['seconds']:>5.2f} {row['peak'] / 2**20:>8.0f} "
              f"{row['peak'] / max(base['peak'], 1):>5.2f} {excess:>19.2f}")
    print()
    print("# targets: (b)/(a) <= 1.8x time, (c)/(a) <= 2.5x time; our peak extra <= (a)'s + one fp32 shard;"
          " (d)'s peak >= 2x ours")
    by_case = {}
    for row in rows:
        by_case.setdefault((row["vocab"], row["tp"], row["dtype"]), {})[(row["method"], row["tokens"])] = row
    for (vocab, tp, dtype), case in by_case.items():
        a, b, c = case[("a megatron", TOKENS)], case[("b live", TOKENS)], case[("c snapshot", TOKENS)]
        (d_key,) = [k for k in case if k[0] == "d naive"]
        d = case[d_key]
        d_vs_ours = d["peak"] / (b["peak"] * d_key[1] / TOKENS)  # ours scaled to (d)'s token count (linear in tokens)
        checks = [
            ("b time", b["seconds"] / a["seconds"] <= 1.8, f"{b['seconds'] / a['seconds']:.2f}x"),
            ("c time", c["seconds"] / a["seconds"] <= 2.5, f"{c['seconds'] / a['seconds']:.2f}x"),
            ("b mem", b["peak"] <= a["peak"] + b["shard"], f"{(b['peak'] - a['peak']) / b['shard']:+.2f} shards"),
            ("c mem", c["peak"] <= a["peak"] + c["shard"], f"{(c['peak'] - a['peak']) / c['shard']:+.2f} shards"),
            ("d mem >= 2x b", d_vs_ours >= 2.0, f"{d_vs_ours:.2f}x" + ("" if d_key[1] == TOKENS else f" (d at {d_key[1]} tokens, ours scaled)")),
        ]
        line = "  ".join(f"{name}: {value} {'MET' if ok else 'MISSED'}" for name, ok, value in checks)
        line += f"  (e eager / b fused: {case[('e live, eager', TOKENS)]['seconds'] / b['seconds']:.2f}x)"
        print(f"V={vocab:>6} TP={tp} {dtype:>8}: {line}")


if __name__ == "__main__":
    main()
