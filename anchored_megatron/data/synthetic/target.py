"""The target task, iGSM-style: arithmetic mod 10 over a random dependency graph of named
quantities, answered with a worked solution and a final answer.

    prompt:   ``b=3,x=b+4,k=x*b,k?``
    solution: ``x=3+4=7,k=7*3=1#1``   (the canonical, fine-tuning format)

Every quantity after the first is ``u op w`` where ``u`` is an earlier quantity and ``w``
an earlier quantity or a digit, so the quantities form a random DAG; the question asks for
the last one. Variants of the same solution (for the high-entropy regime) change the step
separator and the answer marker; the *concise* format is the answer digit alone.
"""

from __future__ import annotations

import random
import re

from anchored_megatron.data.synthetic.skills import LETTERS

OPS = {"+": lambda a, b: (a + b) % 10, "-": lambda a, b: (a - b) % 10, "*": lambda a, b: (a * b) % 10}
SEPARATORS = (",", ";", " ")
MARKERS = ("#", " ans ", " => ")
CANONICAL = (",", "#")  # the fine-tuning format: separator, answer marker

_STEP = re.compile(r"([a-z])=([a-z]|\d)([+*-])([a-z]|\d)")
_ANSWER = re.compile(r"(?:#| ans | => )(\d)")


class TargetTask:
    name = "target"

    def __init__(self, min_steps: int = 2, max_steps: int = 3):
        if not 1 <= min_steps <= max_steps <= 8:
            raise ValueError(f"target steps must satisfy 1 <= min_steps <= max_steps <= 8, got {min_steps}, {max_steps}")
        self.min_steps, self.max_steps = min_steps, max_steps

    def make_prompt(self, rng: random.Random) -> str:
        names = rng.sample(LETTERS, 1 + rng.randint(self.min_steps, self.max_steps))
        parts = [f"{names[0]}={rng.randint(0, 9)}"]
        for i, name in enumerate(names[1:], start=1):
            u = rng.choice(names[:i])
            w = rng.choice(names[:i]) if rng.random() < 0.5 else str(rng.randint(1, 9))
            parts.append(f"{name}={u}{rng.choice(tuple(OPS))}{w}")
        return ",".join(parts) + f",{names[-1]}?"

    def steps(self, prompt: str) -> list[tuple[str, int, str, int, int]]:
        """(name, left value, op, right value, result) per derived quantity, in order."""
        if not prompt.endswith("?"):
            raise ValueError(f"target: malformed prompt {prompt!r}")
        *definitions, question = prompt[:-1].split(",")
        first = re.fullmatch(r"([a-z])=(\d)", definitions[0]) if definitions else None
        if first is None:
            raise ValueError(f"target: malformed prompt {prompt!r}")
        values = {first.group(1): int(first.group(2))}
        out = []
        for text in definitions[1:]:
            m = _STEP.fullmatch(text)
            if m is None or m.group(1) in values:
                raise ValueError(f"target: malformed step {text!r} in {prompt!r}")
            name, u, op, w = m.groups()
            try:
                left = values[u] if u.isalpha() else int(u)
                right = values[w] if w.isalpha() else int(w)
            except KeyError:
                raise ValueError(f"target: {text!r} uses an undefined quantity in {prompt!r}") from None
            values[name] = OPS[op](left, right)
            out.append((name, left, op, right, values[name]))
        if not out or question != out[-1][0]:
            raise ValueError(f"target: the question must ask for the last quantity in {prompt!r}")
        return out

    def answer(self, prompt: str) -> int:
        return self.steps(prompt)[-1][4]

    def solution(self, prompt: str, separator: str = CANONICAL[0], marker: str = CANONICAL[1]) -> str:
        worked = separator.join(f"{n}={a}{op}{b}={r}" for n, a, op, b, r in self.steps(prompt))
        return f"{worked}{marker}{self.answer(prompt)}"

    def random_solution(self, prompt: str, rng: random.Random) -> str:
        return self.solution(prompt, rng.choice(SEPARATORS), rng.choice(MARKERS))

    def check_exact(self, prompt: str, response: str) -> bool:
        """The fine-tuning format, worked steps and answer, exactly."""
        try:
            return response == self.solution(prompt)
        except ValueError:
            return False

    def check_answer(self, prompt: str, content: str | None) -> bool:
        """The right final answer in any format (worked solution with any marker, or concise)."""
        if content is None:
            return False
        try:
            expected = self.answer(prompt)
        except ValueError:
            return False
        if re.fullmatch(r"\d", content):
            return int(content) == expected
        found = _ANSWER.findall(content)
        return len(found) == 1 and content.endswith(found[0]) and int(found[0]) == expected
