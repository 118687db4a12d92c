"""`make demo`: a 2-process TP=2 forward/backward of a tiny Llama-shaped Megatron model on CPU.

Placeholder until the forgetting demo lands: it proves the platform layer end to end.
Runs under torchrun (``torchrun --nproc_per_node 2 -m anchored_megatron.demo``) or, when
started as a plain script, spawns its two gloo ranks itself.
"""

from __future__ import annotations

import os
import time

import torch


def _tp2_step() -> dict:
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from anchored_megatron.config import ModelConfig, ParallelConfig
    from anchored_megatron.models.builder import build_model_chunks
    from anchored_megatron.platform import initialize

    parallel = ParallelConfig(tp=2)
    runtime = initialize(parallel, seed=1234)
    model = ModelConfig()
    (chunk,) = build_model_chunks(model, parallel)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.vocab_size, (4, model.seq_length + 1), generator=g)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    positions = torch.arange(model.seq_length).unsqueeze(0).expand_as(inputs)
    start = time.perf_counter()
    logits = chunk(inputs, positions, None)
    loss = vocab_parallel_cross_entropy(logits.float().clone(), labels).mean()
    loss.backward()
    grad_sq = sum(p.grad.float().pow(2).sum() for p in chunk.parameters() if p.grad is not None)
    return {
        "rank": runtime.rank,
        "loss": loss.item(),
        "local_logits": tuple(logits.shape),
        "grad_norm_local": grad_sq.sqrt().item(),
        "seconds": time.perf_counter() - start,
        "backend": runtime.backend,
    }


def main() -> None:
    if "RANK" in os.environ:
        result = _tp2_step()
        if result["rank"] == 0:
            _report([result])
        return
    from anchored_megatron.testing import run_on_ranks

    _report(run_on_ranks(_tp2_step, 2, timeout=300))


def _report(results: list[dict]) -> None:
    first = results[0]
    print(
        f"TP=2 forward/backward on {first['backend']}: loss {first['loss']:.4f} "
        f"(ln V = {torch.log(torch.tensor(256.0)).item():.4f} for a random model), "
        f"local logits {first['local_logits']} per rank, step {first['seconds']:.2f} s"
    )


if __name__ == "__main__":
    main()
