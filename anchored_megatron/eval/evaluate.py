"""Evaluate model chunks (any TP) on held-out prompts: generate greedily, then score.

Collective: every rank calls it with the same arguments; all ranks return the same dict.
"""

from __future__ import annotations

from anchored_megatron.data.synthetic import render_prompt
from anchored_megatron.eval.generate import greedy_generate
from anchored_megatron.eval.scoring import TARGET, accuracy


def evaluate_chunks(chunks, tokenizer, prompts: dict[str, list[str]], *, vocab_size: int, max_length: int,
                    max_new_tokens: int = 64, batch_size: int = 256, entropy: bool = False, target=None) -> dict:
    """-> {"accuracy": {task: acc}, "target_answer": acc, "entropy": {task: nats/token} (if asked),
    "samples": {task: [first 3 (prompt, response)]}}."""
    tasks = list(prompts)
    flat = [(task, p) for task in tasks for p in prompts[task]]
    encoded = [tokenizer.encode(render_prompt(p)) for _, p in flat]
    gen = greedy_generate(chunks, encoded, eos_id=tokenizer.eos_id, vocab_size=vocab_size, max_new_tokens=max_new_tokens,
                          max_length=max_length, pad_id=tokenizer.pad_id, batch_size=batch_size, entropy=entropy)
    responses = [tokenizer.decode(t) for t in gen.tokens]
    result = {"accuracy": {}, "samples": {}}
    offset = 0
    for task in tasks:
        n = len(prompts[task])
        scores = accuracy(task, prompts[task], responses[offset:offset + n], target)
        result["accuracy"][task] = scores["exact"]
        if task == TARGET:
            result["target_answer"] = scores["answer"]
        result["samples"][task] = list(zip(prompts[task][:3], responses[offset:offset + 3]))
        offset += n
    if entropy:
        # The model's mean per-token entropy along its own greedy responses, per task.
        result["entropy"] = {}
        offset = 0
        for task in tasks:
            n = len(prompts[task])
            total = sum(gen.entropy_sums[offset:offset + n])
            steps = sum(gen.entropy_steps[offset:offset + n])
            result["entropy"][task] = total / max(1, steps)
            offset += n
    return result
