"""Helpers for tests and benchmarks: run a function on N gloo ranks."""

from anchored_megatron.testing.distributed import RankFailure, run_on_ranks

__all__ = ["RankFailure", "run_on_ranks"]
