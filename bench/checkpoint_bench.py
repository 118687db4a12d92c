"""What checkpoint manifests cost: checksum throughput, and save / load time with and without them.

For each model size, one process (a one-rank gloo group, CPU) saves a trainer-style checkpoint
(model + distributed-optimizer state) and loads it back, ``--repeats`` times, interleaved:
- save: ``save_checkpoint`` (which writes the manifest) against its manifest step alone, timed by
  re-running that step on the published directory (files still in the page cache, as at save time);
- load: ``load_checkpoint`` with checksums against without (sizes only), page cache warm for both.
Throughput of XXH3-128 (the manifest's checksum) is reported next to hashlib's sha256 and blake2b
over the same checkpoint files. Medians over the repeats.

    .venv/bin/python bench/checkpoint_bench.py [--repeats 3] [--sizes tiny,h1024]
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SIZES = {
    # the trainer tests' model
    "tiny": dict(num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2, vocab_size=256, seq_length=64),
    # hidden 1024, about 1.1 GB of checkpoint (fp32 weights + Adam state)
    "h1024": dict(num_layers=4, hidden_size=1024, ffn_hidden_size=2816, num_attention_heads=16, num_query_groups=4, vocab_size=8192, seq_length=64),
}


def _hashlib_rate(paths: list[str], name: str) -> float:
    started = time.perf_counter()
    size = 0
    for path in paths:
        with open(path, "rb") as fh:
            hashlib.file_digest(fh, name)
        size += os.path.getsize(path)
    return size / (time.perf_counter() - started)


def measure(size_name: str, repeats: int, work_dir: str) -> dict:
    """One size, in a one-rank process group: every timing of the table."""
    from anchored_megatron.checkpoint import manifest
    from anchored_megatron.checkpoint import trainer_io as ckpt
    from anchored_megatron.config import ModelConfig, OptimConfig, ParallelConfig
    from anchored_megatron.models.builder import build_model_chunks
    from anchored_megatron.platform import initialize
    from anchored_megatron.training.optim import build_optimizer, wrap_ddp

    initialize(ParallelConfig(), seed=0)
    model = ModelConfig(**SIZES[size_name])
    chunks = build_model_chunks(model, ParallelConfig())
    wrapped = wrap_ddp(chunks, True)
    optimizer, _ = build_optimizer(wrapped, OptimConfig(), chunks[0].config.params_dtype, 10)
    for chunk in wrapped:
        chunk.zero_grad_buffer()
    for param in chunks[0].parameters():
        param.main_grad.normal_(std=1e-3)  # one step with random gradients: real Adam state to save
    optimizer.step()
    rows = {"save_s": [], "manifest_s": [], "load_checksums_s": [], "load_sizes_s": [], "xxh3_Bps": [], "sha256_Bps": [], "blake2b_Bps": []}
    root = os.path.join(work_dir, size_name)
    for repeat in range(repeats):
        started = time.perf_counter()
        path = ckpt.save_checkpoint(root, repeat, wrapped, optimizer, {"step": repeat})
        rows["save_s"].append(time.perf_counter() - started)
        started = time.perf_counter()
        ckpt.write_manifest(path)
        rows["manifest_s"].append(time.perf_counter() - started)
        for checksums, key in ((True, "load_checksums_s"), (False, "load_sizes_s")):
            started = time.perf_counter()
            ckpt.load_checkpoint(path, wrapped, optimizer, checksums=checksums)
            rows[key].append(time.perf_counter() - started)
        paths = [os.path.join(path, n) for n in manifest.list_files(path)]
        nbytes = sum(os.path.getsize(p) for p in paths)
        started = time.perf_counter()
        manifest.hash_entries(path, manifest.list_files(path))
        rows["xxh3_Bps"].append(nbytes / (time.perf_counter() - started))
        rows["sha256_Bps"].append(_hashlib_rate(paths, "sha256"))
        rows["blake2b_Bps"].append(_hashlib_rate(paths, "blake2b"))
        ckpt.prune(root, keep=1)
    result = {key: statistics.median(values) for key, values in rows.items()}
    result.update(size=size_name, bytes=nbytes, files=len(paths))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", default="tiny,h1024")
    args = parser.parse_args()

    import torch

    from anchored_megatron.platform import run_on_ranks

    print(f"# checkpoint_bench  {datetime.date.today()}  torch {torch.__version__}  {os.cpu_count()} CPU cores (shared)")
    print(f"# medians of {args.repeats}; one rank; page cache warm; rates in GB/s over every file of the checkpoint")
    print(f"{'size':>6} {'MB':>8} {'files':>5} {'save s':>7} {'manifest s':>10} {'x save':>6} {'load s':>7} {'load, sizes s':>13} "
          f"{'x load':>6} {'xxh3':>5} {'sha256':>6} {'blake2b':>7}")
    with tempfile.TemporaryDirectory(prefix="ckpt-bench-") as work_dir:
        for size in args.sizes.split(","):
            r = run_on_ranks(measure, 1, size, args.repeats, work_dir, timeout=3600)[0]
            print(f"{r['size']:>6} {r['bytes'] / 1e6:8.1f} {r['files']:5d} {r['save_s']:7.2f} {r['manifest_s']:10.3f} "
                  f"{r['manifest_s'] / r['save_s']:6.2f} {r['load_checksums_s']:7.2f} {r['load_sizes_s']:13.2f} "
                  f"{r['load_checksums_s'] / r['load_sizes_s']:6.2f} {r['xxh3_Bps'] / 1e9:5.2f} {r['sha256_Bps'] / 1e9:6.2f} {r['blake2b_Bps'] / 1e9:7.2f}")


if __name__ == "__main__":
    main()
