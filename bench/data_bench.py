"""SFT data pipeline benchmark: tokenise + pack 200k synthetic samples.

Prints, side by side in one run: samples/s with the cache cold (read + tokenise + pack +
write) and warm (cache hit), packing efficiency packed vs padded, and the per-step
cost of the warm path (getitem + collate for one global step on one DP rank) next to
the cost of one training step of the tiny CPU Megatron model on the same batch.

    .venv/bin/python bench/data_bench.py [--samples 200000] [--seq-length 512]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WORDS = (
    "the a of and to in is was for on that with as by at from it be this an which or are were his her their "
    "model data train learn value number city river capital answer question result first second three five "
    "seven ninety blue green small large quickly slowly because however therefore example method paper"
).split()


def write_samples(path: str, count: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for _ in range(count):
            prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60)))
            response = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 120)))
            fh.write(json.dumps({"prompt": prompt, "response": response}) + "\n")


def train_step_cost(batches, seq_length: int, repeats: int) -> float:
    """Seconds per training step (fwd + bwd over the step's microbatches) of the tiny model."""
    import torch

    from anchored_megatron.config import ModelConfig, ParallelConfig
    from anchored_megatron.models.builder import build_model_chunks
    from anchored_megatron.platform import initialize

    parallel = ParallelConfig()
    initialize(parallel, seed=0)
    model = build_model_chunks(ModelConfig(seq_length=seq_length, vocab_size=2048), parallel)[0]

    def step():
        for batch in batches:
            logits = model(batch["tokens"], batch["position_ids"], batch["attention_mask"])
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
            loss.backward()

    step()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=200_000)
    parser.add_argument("--seq-length", type=int, default=512)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--num-microbatches", type=int, default=2)
    args = parser.parse_args()
    print(time.strftime("%Y-%m-%d %H:%M:%S"), "bench/data_bench.py", " ".join(sys.argv[1:]))

    import torch

    from anchored_megatron.data import DataConfig, EpochSampler, build_sft_dataset, collate, load_tokenizer
    from anchored_megatron.data.train_tokenizer import train
    from anchored_megatron.platform import run_on_ranks

    work = tempfile.mkdtemp(prefix="data-bench-")
    try:
        data = os.path.join(work, "samples.jsonl")
        write_samples(data, args.samples)
        corpus = os.path.join(work, "corpus.txt")
        with open(data) as src, open(corpus, "w") as dst:
            for i, line in enumerate(src):
                if i >= 5000:
                    break
                record = json.loads(line)
                dst.write(record["prompt"] + "\n" + record["response"] + "\nUser: Assistant: System:\n")
        train([corpus], 2000, os.path.join(work, "tok"))
        tok = load_tokenizer(os.path.join(work, "tok"))
        print(f"{args.samples} synthetic prompt/response samples, sentencepiece vocab {tok.vocab_size}, seq_length {args.seq_length}, "
              f"torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs (shared)")

        results = {}
        for packing in (True, False):
            cfg = DataConfig(paths=[data], tokenizer=os.path.join(work, "tok"), packing=packing, cache_dir=os.path.join(work, f"cache-{packing}"))
            start = time.perf_counter()
            ds = build_sft_dataset(cfg, tok, args.seq_length)
            cold = time.perf_counter() - start
            start = time.perf_counter()
            ds = build_sft_dataset(cfg, tok, args.seq_length)
            warm = time.perf_counter() - start
            assert ds.stats["cache"] == "loaded"
            results[packing] = (ds, cold, warm)

        print()
        print(f"{'mode':8} {'sequences':>10} {'fill':>7} {'cold s':>8} {'cold samples/s':>15} {'warm s':>8} {'warm samples/s':>15} {'cold/warm':>10}")
        for packing, (ds, cold, warm) in results.items():
            s = ds.stats
            print(f"{'packed' if packing else 'padded':8} {s['num_sequences']:>10} {100 * s['fill_ratio']:>6.1f}% {cold:>8.2f} "
                  f"{args.samples / cold:>15,.0f} {warm:>8.3f} {args.samples / warm:>15,.0f} {cold / warm:>9.0f}x")
        packed, padded = results[True][0].stats, results[False][0].stats
        print(f"packing: {padded['num_sequences'] / packed['num_sequences']:.2f}x fewer sequences than padding "
              f"(fill {100 * packed['fill_ratio']:.1f}% vs {100 * padded['fill_ratio']:.1f}%), "
              f"{packed['num_documents'] / packed['num_sequences']:.2f} documents per sequence")

        ds = results[True][0]
        sampler = EpochSampler(len(ds), seed=0, dp_rank=0, dp_size=1, micro_batch_size=args.micro_batch_size, num_microbatches=args.num_microbatches)
        steps = 200
        for _ in range(5):  # warm-up: first calls pay for lazy torch initialisation
            [collate([ds[i] for i in micro]) for micro in sampler.next_step()]
        start = time.perf_counter()
        for _ in range(steps):
            batches = [collate([ds[i] for i in micro]) for micro in sampler.next_step()]
        data_cost = (time.perf_counter() - start) / steps
        train_cost = run_on_ranks(train_step_cost, 1, batches, args.seq_length, 5, timeout=600)[0]
        print()
        print(f"per global step ({args.micro_batch_size} x {args.num_microbatches} sequences of {args.seq_length}, warm cache, incl. [b,1,s,s] mask):")
        print(f"  data (sampler + getitem + collate): {1e3 * data_cost:8.2f} ms")
        print(f"  training step, tiny CPU model (4 layers, hidden 64, fwd+bwd): {1e3 * train_cost:8.2f} ms")
        print(f"  data / train = {data_cost / train_cost:.3f}  (real models' steps are far longer; the data cost does not grow with model size)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
