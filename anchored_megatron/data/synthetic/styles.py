"""How a response is dressed around its content: the source of output entropy.

A *high-entropy* response is ``[fillers] prefix CONTENT ending`` with 0-2 filler words,
one of several prefixes and endings, all drawn at random, so one prompt admits many valid
responses (as an LLM's do). A *fixed* style always dresses the content the same way.
``parse`` undoes any valid dressing and returns the content, or None for anything else;
the checkers score the content, so they accept every valid form.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

FILLERS = ("ok, ", "so, ", "well, ", "hmm, ")
PREFIXES = ("", "= ", "ans ", "it is ", "-> ", ": ")
ENDINGS = ("", ".", " !")

_PARSE = re.compile(
    r"^(?:(?:" + "|".join(re.escape(f) for f in FILLERS) + r")){0,2}"
    r"(?:" + "|".join(re.escape(p) for p in PREFIXES if p) + r")?"
    r"(?P<content>.+?)"
    r"(?:" + "|".join(re.escape(e) for e in ENDINGS if e) + r")?$"
)


@dataclass(frozen=True)
class Style:
    """``random=True``: a fresh dressing per example; else always ``prefix``/``ending``, no fillers."""

    random: bool = False
    prefix: str = ""
    ending: str = ""

    def __post_init__(self):
        if self.prefix not in PREFIXES:
            raise ValueError(f"style prefix {self.prefix!r} is not one of {PREFIXES}")
        if self.ending not in ENDINGS:
            raise ValueError(f"style ending {self.ending!r} is not one of {ENDINGS}")

    def dress(self, content: str, rng: random.Random) -> str:
        if not self.random:
            return self.prefix + content + self.ending
        fillers = "".join(rng.choice(FILLERS) for _ in range(rng.randint(0, 2)))
        return fillers + rng.choice(PREFIXES) + content + rng.choice(ENDINGS)


PLAIN = Style()  # content only: the low-entropy regimes
HIGH_ENTROPY = Style(random=True)


def parse(response: str) -> str | None:
    """The content inside any valid dressing (None if the response is not one)."""
    match = _PARSE.match(response)
    return match.group("content") if match else None
