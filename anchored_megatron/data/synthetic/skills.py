"""General skills the base learns first and the target data never shows.

Each skill makes ``(prompt, content)`` from a seeded ``random.Random`` and checks a
content against the prompt alone (it recomputes the answer from the prompt), so a
checker never trusts the generator. Prompts start with the skill's name.
"""

from __future__ import annotations

import random
import re

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _word(rng: random.Random, low: int, high: int) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(low, high)))


class Skill:
    name: str = ""

    def make(self, rng: random.Random) -> tuple[str, str]:
        raise NotImplementedError

    def answer(self, prompt: str) -> str:
        """The one correct content for ``prompt`` (raises ValueError if it is not this skill's)."""
        raise NotImplementedError

    def check(self, prompt: str, content: str | None) -> bool:
        if content is None:
            return False
        try:
            return content == self.answer(prompt)
        except ValueError:
            return False

    def _match(self, pattern: str, prompt: str) -> re.Match:
        match = re.fullmatch(pattern, prompt)
        if match is None:
            raise ValueError(f"{self.name}: malformed prompt {prompt!r}")
        return match


class Add(Skill):
    """Two-digit addition: ``add 47+85`` -> ``132``."""

    name = "add"

    def make(self, rng):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        prompt = f"add {a}+{b}"
        return prompt, self.answer(prompt)

    def answer(self, prompt):
        m = self._match(r"add (\d+)\+(\d+)", prompt)
        return str(int(m.group(1)) + int(m.group(2)))


class Reverse(Skill):
    """``rev kapol`` -> ``lopak``."""

    name = "rev"

    def make(self, rng):
        prompt = f"rev {_word(rng, 3, 6)}"
        return prompt, self.answer(prompt)

    def answer(self, prompt):
        return self._match(r"rev ([a-z]+)", prompt).group(1)[::-1]


class Upper(Skill):
    """IFEval-style formatting, upper case: ``up kapol`` -> ``KAPOL``."""

    name = "up"

    def make(self, rng):
        prompt = f"up {_word(rng, 3, 6)}"
        return prompt, self.answer(prompt)

    def answer(self, prompt):
        return self._match(r"up ([a-z]+)", prompt).group(1).upper()


class Repeat(Skill):
    """IFEval-style formatting, repeat n times: ``rep 3 kap`` -> ``kap kap kap``."""

    name = "rep"

    def make(self, rng):
        prompt = f"rep {rng.randint(2, 4)} {_word(rng, 2, 4)}"
        return prompt, self.answer(prompt)

    def answer(self, prompt):
        m = self._match(r"rep (\d) ([a-z]+)", prompt)
        return " ".join([m.group(2)] * int(m.group(1)))


class KeyValue(Skill):
    """Key-value recall: ``kv a7 c2 f5 ?c`` -> ``2``."""

    name = "kv"

    def make(self, rng):
        keys = rng.sample(LETTERS, 3)
        pairs = " ".join(f"{k}{rng.randint(0, 9)}" for k in keys)
        prompt = f"kv {pairs} ?{rng.choice(keys)}"
        return prompt, self.answer(prompt)

    def answer(self, prompt):
        m = self._match(r"kv ((?:[a-z]\d )+)\?([a-z])", prompt)
        table = {pair[0]: pair[1] for pair in m.group(1).split()}
        if len(table) != len(m.group(1).split()) or m.group(2) not in table:
            raise ValueError(f"kv: malformed prompt {prompt!r}")
        return table[m.group(2)]


GENERAL_SKILLS: dict[str, Skill] = {s.name: s for s in (Add(), Reverse(), Upper(), Repeat(), KeyValue())}
