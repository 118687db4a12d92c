"""The general-retention suite of the real-model study: what a pretrained instruction model can
already do, asked in chat format and scored by code.

Three kinds of items, each a dict ``{"id", "kind", "prompt", "check": {...}}``:

- ``instruction``: a request with a verifiable constraint in the style of IFEval (all capitals, no
  commas, a required ending, valid JSON with given keys, N bullet points, ...); ``check`` names
  the constraint and its argument, and ``passes`` checks it.
- ``fact``: a short factual or arithmetic question; a factual one's ``check["answers"]`` are the
  accepted answers, matched as whole words (case-insensitive) in the reply; an arithmetic one's
  ``check["final_number"]`` must be the reply's last number (its operands appear in most replies).
- the base's own answers to general prompts (``general_prompts``) are not scored here: the study
  measures the student's NLL of them and KL(p_base || p_theta) on them (``eval.general_paths``).

``candidates`` makes every candidate item from fixed lists and a string seed, so the same
version gives the same items anywhere; the study keeps those the base answers correctly
(``bench/real_retention.py``) and versions the kept set in the repository.
"""

from __future__ import annotations

import json
import random
import re

VERSION = 1

TOPICS = ("the ocean", "a city at night", "winter", "a library", "coffee", "mountains", "a train journey", "the moon",
          "a garden", "music", "rain", "a market", "friendship", "the desert", "a museum", "bicycles", "the forest",
          "a thunderstorm", "breakfast", "the stars", "a river", "autumn", "a lighthouse", "cats", "the summer",
          "a bakery", "dogs", "the beach", "a school", "snow", "a volcano", "an old house", "the wind", "a bridge",
          "a farm", "the sea", "a clock", "a kitchen", "the sunrise", "a park", "birds", "a village", "a painting",
          "a road trip", "flowers", "a bookshop", "the harbor", "a picnic", "spring", "a castle")
ENDINGS = ("Is there anything else I can help with?", "That is all.", "Thank you for reading.", "The end.")
KEYWORDS = ("blue", "light", "quiet", "water", "morning", "green", "bright", "warm")
JSON_KEYS = (("name", "color"), ("title", "year"), ("city", "country"), ("animal", "sound"), ("fruit", "taste"))

CAPITALS = {"France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
            "China": "Beijing", "Russia": "Moscow", "Egypt": "Cairo", "Canada": "Ottawa", "Greece": "Athens",
            "Portugal": "Lisbon", "Austria": "Vienna", "Norway": "Oslo", "Sweden": "Stockholm", "Poland": "Warsaw",
            "Ireland": "Dublin", "Kenya": "Nairobi", "Peru": "Lima", "Argentina": "Buenos Aires", "Thailand": "Bangkok",
            "England": "London", "Belgium": "Brussels", "Denmark": "Copenhagen", "Finland": "Helsinki",
            "Hungary": "Budapest", "Mexico": "Mexico City", "India": "New Delhi", "South Korea": "Seoul",
            "Turkey": "Ankara", "Cuba": "Havana", "Iran": "Tehran", "Iraq": "Baghdad", "Chile": "Santiago",
            "Colombia": "Bogota", "Vietnam": "Hanoi", "Netherlands": "Amsterdam", "Switzerland": "Bern",
            "Australia": "Canberra", "Brazil": "Brasilia", "Ukraine": "Kyiv"}
FACTS = (("How many days are there in a week?", ("7", "seven")),
         ("How many legs does a spider have?", ("8", "eight")),
         ("How many hours are there in a day?", ("24", "twenty-four")),
         ("What color is the sky on a clear day?", ("blue",)),
         ("What is the largest planet in our solar system?", ("Jupiter",)),
         ("What is the chemical symbol for water?", ("H2O",)),
         ("Which planet is known as the Red Planet?", ("Mars",)),
         ("How many continents are there on Earth?", ("7", "seven")),
         ("What is the freezing point of water in degrees Celsius?", ("0", "zero")),
         ("What do bees make?", ("honey",)),
         ("What is the opposite of hot?", ("cold",)),
         ("What is the opposite of up?", ("down",)),
         ("How many months are there in a year?", ("12", "twelve")),
         ("What gas do plants absorb from the air?", ("carbon dioxide", "CO2")),
         ("Who wrote Romeo and Juliet?", ("Shakespeare", "William Shakespeare")),
         ("What is the boiling point of water in degrees Celsius?", ("100",)),
         ("What animal is known as the king of the jungle?", ("lion",)),
         ("How many sides does a triangle have?", ("3", "three")),
         ("How many sides does a square have?", ("4", "four")),
         ("What is the closest star to Earth?", ("Sun", "the Sun")))
GENERAL_TASKS = ("Write one sentence about {topic}.", "Give three words that describe {topic}.",
                 "Explain in one sentence why people like {topic}.", "Write a short title for a story about {topic}.",
                 "What is one fact about {topic}?", "Describe {topic} to a child in two sentences.",
                 "Write a haiku about {topic}.", "Give one tip for enjoying {topic}.",
                 "What sounds might you hear near {topic}?", "Write the first line of a poem about {topic}.")


def _instruction(rng: random.Random) -> tuple[str, dict]:
    topic = rng.choice(TOPICS)
    kind = rng.choice(("uppercase", "lowercase", "no_commas", "ending", "keyword", "json_keys", "bullets", "max_words", "quoted"))
    if kind == "uppercase":
        return f"Write one sentence about {topic}. Your entire answer must be in capital letters.", {"rule": kind}
    if kind == "lowercase":
        return f"Write one sentence about {topic}. Use only lowercase letters, no capital letters at all.", {"rule": kind}
    if kind == "no_commas":
        return f"Write two sentences about {topic} without using any commas.", {"rule": kind}
    if kind == "ending":
        ending = rng.choice(ENDINGS)
        return f"Write one sentence about {topic}. End your answer with the exact phrase \"{ending}\"", {"rule": kind, "text": ending}
    if kind == "keyword":
        word = rng.choice(KEYWORDS)
        return f"Write one sentence about {topic} that uses the word \"{word}\".", {"rule": kind, "text": word}
    if kind == "json_keys":
        keys = rng.choice(JSON_KEYS)
        return (f"Reply with a JSON object only, with the keys \"{keys[0]}\" and \"{keys[1]}\", describing something "
                f"related to {topic}.", {"rule": kind, "keys": list(keys)})
    if kind == "bullets":
        count = rng.choice((2, 3))
        return (f"List {count} things related to {topic} as a bullet list using '-' or '*', one item per line, "
                "and nothing else.", {"rule": kind, "count": count})
    if kind == "max_words":
        limit = rng.choice((10, 15, 20))
        return f"Describe {topic} in at most {limit} words.", {"rule": kind, "count": limit}
    return f"Write one sentence about {topic} and wrap your entire answer in double quotation marks.", {"rule": kind}


def _json_object(reply: str):
    text = reply.strip()
    fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", text, flags=re.S)
    text = fenced.group(1) if fenced else text
    try:
        return json.loads(text)
    except ValueError:
        return None


def passes(check: dict, reply: str) -> bool:
    """Whether ``reply`` meets the item's check (an instruction's rule, or a fact's answers)."""
    text = reply.strip()
    if "final_number" in check:
        numbers = re.findall(r"-?\d+", text)
        return bool(numbers) and numbers[-1] == check["final_number"]
    if "answers" in check:
        return any(re.search(rf"(?<![\w]){re.escape(answer)}(?![\w])", text, flags=re.I) for answer in check["answers"])
    rule = check["rule"]
    letters = re.findall(r"[A-Za-z]", text)
    if rule == "uppercase":
        return bool(letters) and all(c.isupper() for c in letters)
    if rule == "lowercase":
        return bool(letters) and all(c.islower() for c in letters)
    if rule == "no_commas":
        return bool(text) and "," not in text
    if rule == "ending":
        return text.endswith(check["text"])
    if rule == "keyword":
        return re.search(rf"\b{re.escape(check['text'])}\b", text, flags=re.I) is not None
    if rule == "json_keys":
        value = _json_object(text)
        return isinstance(value, dict) and all(key in value for key in check["keys"])
    if rule == "bullets":
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return len(lines) == check["count"] and all(re.match(r"^[-*]\s+\S", line) for line in lines)
    if rule == "max_words":
        return 0 < len(text.split()) <= check["count"]
    if rule == "quoted":
        return len(text) >= 2 and text[0] == text[-1] == '"' and '"' not in text[1:-1]
    raise ValueError(f"unknown retention check {check!r}")


def candidates(instructions: int = 400, arithmetic: int = 120) -> list[dict]:
    """Every candidate item of this VERSION (before the base's answers filter them)."""
    rng = random.Random(f"retention-v{VERSION}")
    items = []
    for i in range(instructions):
        prompt, check = _instruction(rng)
        items.append({"id": f"instruction-{i}", "kind": "instruction", "prompt": prompt, "check": check})
    for country, capital in CAPITALS.items():
        items.append({"id": f"capital-{country}", "kind": "fact", "prompt": f"What is the capital of {country}? Answer briefly.",
                      "check": {"answers": [capital]}})
    for i, (question, answers) in enumerate(FACTS):
        items.append({"id": f"fact-{i}", "kind": "fact", "prompt": question, "check": {"answers": list(answers)}})
    for i in range(arithmetic):
        op = rng.choice(("plus", "minus", "times"))
        if op == "times":
            x, y = rng.randint(2, 10), rng.randint(2, 10)
            value = x * y
        else:
            x, y = sorted((rng.randint(2, 30), rng.randint(2, 30)), reverse=True)
            value = x + y if op == "plus" else x - y
        items.append({"id": f"arithmetic-{i}", "kind": "fact", "prompt": f"What is {x} {op} {y}? Answer with the number.",
                      "check": {"final_number": str(value)}})
    return items


def general_prompts(exclude: set[str] = frozenset()) -> tuple[list[str], list[str]]:
    """General chat prompts, none in ``exclude``, split in two disjoint halves: the first for the
    evaluation (the student's NLL of the base's answers and KL(p_base || p_theta) on them), the second
    for self-generated replay (the base's answers as training data)."""
    rng = random.Random(f"retention-general-v{VERSION}")
    pool = [prompt for prompt in (task.format(topic=topic) for task in GENERAL_TASKS for topic in TOPICS) if prompt not in exclude]
    rng.shuffle(pool)
    half = len(pool) // 2
    return pool[:half], pool[half:]
