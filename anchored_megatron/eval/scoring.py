"""Checker-based scoring of generated responses, per task.

General skills are scored on their content inside any valid dressing (the base learned
many; fine-tuning never showed these skills, so any valid form counts). The target is
scored two ways: ``exact`` = the fine-tuning format (worked steps and answer) exactly,
the accuracy the gain is measured on; ``answer`` = the right final answer in any format.
"""

from __future__ import annotations

from anchored_megatron.data.synthetic import styles
from anchored_megatron.data.synthetic.skills import GENERAL_SKILLS
from anchored_megatron.data.synthetic.target import TargetTask

TARGET = "target"


def score_response(task: str, prompt: str, response: str, target: TargetTask | None = None) -> dict[str, bool]:
    if task == TARGET:
        target = target or TargetTask()
        return {"exact": target.check_exact(prompt, response), "answer": target.check_answer(prompt, styles.parse(response))}
    if task not in GENERAL_SKILLS:
        raise ValueError(f"unknown task {task!r} (known: {', '.join(GENERAL_SKILLS)}, {TARGET})")
    return {"exact": GENERAL_SKILLS[task].check(prompt, styles.parse(response))}


def accuracy(task: str, prompts: list[str], responses: list[str], target: TargetTask | None = None) -> dict[str, float]:
    """Mean of each score over the items (``exact`` for every task, ``answer`` for the target)."""
    if len(prompts) != len(responses) or not prompts:
        raise ValueError(f"{task}: {len(prompts)} prompts but {len(responses)} responses")
    scores = [score_response(task, p, r, target) for p, r in zip(prompts, responses)]
    return {key: sum(s[key] for s in scores) / len(scores) for key in scores[0]}
