"""Greedy generation through Megatron chunks, task scorers, and the gain / forgetting report."""

from anchored_megatron.eval.evaluate import evaluate_chunks
from anchored_megatron.eval.generate import Generation, greedy_generate
from anchored_megatron.eval.scoring import TARGET, accuracy, score_response

__all__ = ["Generation", "TARGET", "accuracy", "evaluate_chunks", "greedy_generate", "score_response"]
