"""Greedy generation with and without the KV cache, side by side in one process.

A random GPT (hidden 128, 2 layers, 4 heads / 2 query groups, vocab 100) at TP=1 on
2 threads generates for 512 prompts of 36-44 tokens, 48 new tokens each: EOS is an id the
model can never produce (past the true vocabulary), so every row runs its full budget and
both decoders do the same number of steps. After a short warm-up the runs are interleaved
(cached, uncached, cached) and the cached time is the faster of its two runs; the two decoders
must return the same tokens. CPU time on this machine is shared with other jobs (the load
average is printed): with 2 OpenMP threads on 2 busy cores, small ops stall, so treat the
ratio as rough.

    .venv/bin/python bench/generate_bench.py [--prompts 512] [--new 48] [--batch 256]
"""

from __future__ import annotations

import argparse
import datetime
import os
import random
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MODEL = dict(num_layers=2, hidden_size=128, ffn_hidden_size=512, num_attention_heads=4, num_query_groups=2,
             vocab_size=100, seq_length=128)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=512)
    parser.add_argument("--new", type=int, default=48)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    from anchored_megatron.config import ModelConfig, ParallelConfig
    from anchored_megatron.eval.generate import greedy_generate
    from anchored_megatron.models.builder import build_model_chunks
    from anchored_megatron.platform import initialize

    torch.set_num_threads(args.threads)
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    initialize(ParallelConfig(tp=1), seed=0)
    chunks = build_model_chunks(ModelConfig(**MODEL), ParallelConfig(tp=1))
    rng = random.Random(0)
    prompts = [[rng.randrange(3, MODEL["vocab_size"]) for _ in range(rng.randint(36, 44))] for _ in range(args.prompts)]
    kwargs = dict(eos_id=MODEL["vocab_size"], vocab_size=MODEL["vocab_size"], max_new_tokens=args.new,
                  max_length=MODEL["seq_length"], pad_id=0, batch_size=args.batch)

    for kv_cache in (True, False):
        greedy_generate(chunks, prompts[:8], **{**kwargs, "max_new_tokens": 4}, kv_cache=kv_cache)  # warm-up
    seconds, cpu, outputs = {True: [], False: []}, {True: [], False: []}, {}
    load_before = os.getloadavg()[0]
    for kv_cache in (True, False, True):
        start, start_cpu = time.perf_counter(), time.process_time()
        outputs[kv_cache] = greedy_generate(chunks, prompts, **kwargs, kv_cache=kv_cache).tokens
        seconds[kv_cache].append(time.perf_counter() - start)
        cpu[kv_cache].append(time.process_time() - start_cpu)
    seconds = {k: min(v) for k, v in seconds.items()}
    cpu = {k: min(v) for k, v in cpu.items()}
    tokens = sum(len(t) for t in outputs[True])

    lines = [
        f"# generate_bench  {datetime.date.today()}",
        f"model: hidden {MODEL['hidden_size']}, {MODEL['num_layers']} layers, heads 4/2 (GQA), vocab {MODEL['vocab_size']}, "
        f"fp32, TP=1, {args.threads} threads (shared 2-core machine)",
        f"{args.prompts} prompts of 36-44 tokens, {args.new} new tokens each (no EOS), batch {args.batch}",
        f"{'decoder':<12}{'wall s':>8}{'cpu s':>8}{'tokens/s':>10}",
        f"{'kv cache':<12}{seconds[True]:>8.1f}{cpu[True]:>8.1f}{tokens / seconds[True]:>10.0f}",
        f"{'no cache':<12}{seconds[False]:>8.1f}{cpu[False]:>8.1f}{tokens / seconds[False]:>10.0f}",
        f"speedup (no cache / kv cache): wall {seconds[False] / seconds[True]:.1f}x, cpu {cpu[False] / cpu[True]:.1f}x",
        f"1-min load average: {load_before:.1f} before, {os.getloadavg()[0]:.1f} after",
        f"same tokens: {outputs[True] == outputs[False]} ({tokens} generated)",
    ]
    text = "\n".join(lines)
    print(text)
    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    with open(os.path.join(ROOT, "bench", "results", "generate_bench.txt"), "w") as fh:
        fh.write(text + "\n")


if __name__ == "__main__":
    main()
