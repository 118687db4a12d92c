"""The three regimes' data: what the base is pretrained on, the fine-tuning set, held-out sets.

- ``C`` (high-entropy, primary): every general skill and the target are answered in random
  dressings (styles.HIGH_ENTROPY) and, for the target, random separators and markers; the
  fine-tuning data answers in ONE format (the canonical worked solution, undressed).
- ``A`` (paper-like): undressed answers; the base sees the target mostly in an old concise
  format (the answer digit) and a little in the new worked format.
- ``B`` (from scratch): undressed answers; the target is new to the base.

Every set is a pure function of (regime, sizes, seed): ``random.Random`` seeded with a
string is stable across Python runs and platforms.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass

from anchored_megatron.data.synthetic import styles
from anchored_megatron.data.synthetic.skills import GENERAL_SKILLS
from anchored_megatron.data.synthetic.target import TargetTask
from anchored_megatron.platform.files import write_atomically

REGIMES = ("A", "B", "C")
# The prompt/response layout the model sees (a Jinja chat template for data.chat_template):
# "<prompt>\n<response>[EOS]"; only the response and EOS are trained.
PROMPT_SEPARATOR = "\n"
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}" + PROMPT_SEPARATOR.replace("\n", "{{ '\\n' }}")
    + "{% elif m['role'] == 'assistant' %}{{ m['content'] }}{% endif %}{% endfor %}"
)


def render_prompt(prompt: str) -> str:
    """The text the model is given before it answers (matches CHAT_TEMPLATE)."""
    return prompt + PROMPT_SEPARATOR


@dataclass(frozen=True)
class RegimeData:
    regime: str = "C"
    skills: tuple[str, ...] = tuple(GENERAL_SKILLS)
    pretrain_per_skill: int = 2000  # examples of each general skill in the base's data
    target_share: float | None = None  # fraction of pretraining that is target; None = the regime's default
    finetune_examples: int = 1000
    eval_per_skill: int = 500
    target_min_steps: int = 2
    target_max_steps: int = 3

    def validate(self) -> None:
        if self.regime not in REGIMES:
            raise ValueError(f"regime must be one of {REGIMES}, got {self.regime!r}")
        unknown = [s for s in self.skills if s not in GENERAL_SKILLS]
        if unknown or not self.skills:
            raise ValueError(f"skills: unknown {unknown} (known: {', '.join(GENERAL_SKILLS)})")
        for name in ("pretrain_per_skill", "finetune_examples", "eval_per_skill"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.target_share is not None and not 0 <= self.target_share < 1:
            raise ValueError(f"target_share must be in [0, 1), got {self.target_share}")

    @property
    def target(self) -> TargetTask:
        return TargetTask(self.target_min_steps, self.target_max_steps)

    def default_target_share(self) -> float:
        return {"A": 0.16, "B": 0.0, "C": 0.25}[self.regime] if self.target_share is None else self.target_share


def _rng(seed: int, purpose: str) -> random.Random:
    return random.Random(f"anchored-synthetic/{seed}/{purpose}")


def pretrain_records(data: RegimeData, seed: int) -> list[dict]:
    data.validate()
    rng = _rng(seed, f"pretrain/{data.regime}")
    general = styles.HIGH_ENTROPY if data.regime == "C" else styles.PLAIN
    records = []
    for name in data.skills:
        skill = GENERAL_SKILLS[name]
        for _ in range(data.pretrain_per_skill):
            prompt, content = skill.make(rng)
            records.append({"prompt": prompt, "response": general.dress(content, rng)})
    share = data.default_target_share()
    num_target = int(round(share / (1 - share) * len(records))) if share else 0
    task = data.target
    for i in range(num_target):
        prompt = task.make_prompt(rng)
        if data.regime == "C":
            response = general.dress(task.random_solution(prompt, rng), rng)
        elif i % 4 == 0:  # A: a quarter in the new worked format, the rest concise
            response = task.solution(prompt)
        else:
            response = str(task.answer(prompt))
        records.append({"prompt": prompt, "response": response})
    rng.shuffle(records)
    return records


def replay_records(data: RegimeData, seed: int, count: int, exclude: set[str] = frozenset()) -> list[dict]:
    """``count`` general-skill records drawn as the base's pretraining draws them (same skills
    and dressing, its own random stream), none with a prompt in ``exclude`` (the held-out
    prompts): what a replay trust region keeps the student close to its snapshot on."""
    data.validate()
    rng = _rng(seed, f"replay/{data.regime}")
    general = styles.HIGH_ENTROPY if data.regime == "C" else styles.PLAIN
    records = []
    while len(records) < count:
        skill = GENERAL_SKILLS[data.skills[len(records) % len(data.skills)]]
        for _ in range(50):
            prompt, content = skill.make(rng)
            if prompt not in exclude:
                break
        records.append({"prompt": prompt, "response": general.dress(content, rng)})
    return records


def finetune_records(data: RegimeData, seed: int) -> list[dict]:
    """The target in ONE format: the canonical worked solution (same in every regime)."""
    data.validate()
    rng = _rng(seed, "finetune")
    task = data.target
    prompts = [task.make_prompt(rng) for _ in range(data.finetune_examples)]
    return [{"prompt": p, "response": task.solution(p)} for p in prompts]


def eval_prompts(data: RegimeData, seed: int, exclude: set[str] = frozenset()) -> dict[str, list[str]]:
    """Held-out prompts per task (general skills + "target"), none of them in ``exclude``
    (the training prompts) while the task's prompt space allows; duplicates are allowed
    only after 50 rejected draws in a row."""
    data.validate()
    rng = _rng(seed, "eval")
    out: dict[str, list[str]] = {}
    makers = {name: (lambda r, s=GENERAL_SKILLS[name]: s.make(r)[0]) for name in data.skills}
    makers["target"] = data.target.make_prompt
    for name, make in makers.items():
        chosen, seen = [], set()
        while len(chosen) < data.eval_per_skill:
            for _ in range(50):
                prompt = make(rng)
                if prompt not in exclude and prompt not in seen:
                    break
            seen.add(prompt)
            chosen.append(prompt)
        out[name] = chosen
    return out


def write_jsonl(records: list[dict], path: str) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    write_atomically(path, "".join(json.dumps(record) + "\n" for record in records))
    return path


def alphabet() -> str:
    """Every character any prompt, response or separator can contain."""
    chars = set("abcdefghijklmnopqrstuvwxyz" + "abcdefghijklmnopqrstuvwxyz".upper() + "0123456789" + " =+-*,;#?.!:>" + PROMPT_SEPARATOR)
    for text in styles.FILLERS + styles.PREFIXES + styles.ENDINGS:
        chars.update(text)
    return "".join(sorted(chars))


def train_char_tokenizer(output_dir: str) -> str:
    """A character-level sentencepiece tokenizer over ``alphabet()``; returns the directory.
    Reused when it already exists (training it is deterministic)."""
    from anchored_megatron.data.train_tokenizer import train

    model = os.path.join(output_dir, "tokenizer.model")
    if os.path.isfile(model):
        return output_dir
    os.makedirs(output_dir, exist_ok=True)
    corpus = os.path.join(output_dir, "alphabet.txt")
    letters = alphabet().replace("\n", "")
    with open(corpus, "w", encoding="utf-8") as fh:
        # Each character on many lines so sentencepiece keeps it as a piece of its own.
        for _ in range(20):
            fh.write(" ".join(letters) + "\n" + letters + "\n")
    train([corpus], vocab_size=len(letters) + 5, output=output_dir, model_type="char")
    return output_dir
