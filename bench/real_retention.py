"""Build the real-model study's general-retention suite (anchored_megatron/eval/retention.py) from
what SmolLM2-135M-Instruct itself answers, greedy, through its chat template:

1. every candidate item of the suite's version is asked; an item is kept only when the base's reply
   passes its check, so the base scores 100% and a student's degradation reads directly as a
   share of what the base could do;
2. the general prompts' two halves are asked too: the first half's replies are the evaluation's
   general data (the student's NLL of the base's answers, KL(p_base || p_theta) on them:
   ``eval.general_paths``), the second half's the self-generated replay data (training data of the
   replay methods, disjoint from everything evaluated).

Writes bench/data/real/: candidates_v{N}.jsonl (every candidate with the base's reply, so that a
revised check re-filters without asking again; reused when present), retention_v{N}.jsonl (the kept items),
general_eval_v{N}.jsonl and general_replay_v{N}.jsonl ({"prompt", "response"} records), and prints
how many candidates of each kind were kept.

    .venv/bin/python bench/real_retention.py [--threads 2] [--regenerate]
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

OUT = os.path.join(ROOT, "bench", "data", "real")
MAX_NEW = {"instruction": 64, "fact": 32, "general": 64}


def _write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
    os.replace(path + ".tmp", path)


def _stored_replies(path: str, items: list[dict]) -> dict | None:
    """The base's stored reply per candidate id, when the file holds exactly these candidates."""
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as fh:
        stored = [json.loads(line) for line in fh]
    strip = lambda item: {k: v for k, v in item.items() if k != "base_reply"}  # noqa: E731
    if [strip(s) for s in stored] != items:
        return None
    return {s["id"]: s["base_reply"] for s in stored}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--regenerate", action="store_true", help="ask the base again even where its replies are stored")
    args = parser.parse_args()
    from anchored_megatron.convert.fetch_smollm2 import fetch
    from anchored_megatron.eval import retention
    from anchored_megatron.eval.hf_chat import ChatModel

    hf_dir = fetch()
    # Loaded on the first question: when every file is stored already, nothing is asked.
    chat = functools.cache(lambda: ChatModel(hf_dir, threads=args.threads))
    os.makedirs(OUT, exist_ok=True)
    version = retention.VERSION
    items = retention.candidates()
    started = time.perf_counter()
    asked_path = os.path.join(OUT, f"candidates_v{version}.jsonl")
    replies = None if args.regenerate else _stored_replies(asked_path, items)
    if replies is None:
        replies = {}
        for kind in ("instruction", "fact"):
            group = [item for item in items if item["kind"] == kind]
            answers = chat().greedy([item["prompt"] for item in group], MAX_NEW[kind])
            replies.update({item["id"]: reply for item, reply in zip(group, answers)})
            print(f"{kind}: {len(group)} candidates asked in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
        _write_jsonl(asked_path, [dict(item, base_reply=replies[item["id"]]) for item in items])
    kept = [dict(item, base_reply=replies[item["id"]]) for item in items if retention.passes(item["check"], replies[item["id"]])]
    _write_jsonl(os.path.join(OUT, f"retention_v{version}.jsonl"), kept)

    evaluation, replay = retention.general_prompts(exclude={item["prompt"] for item in items})
    for name, prompts in (("eval", evaluation), ("replay", replay)):
        if os.path.exists(os.path.join(OUT, f"general_{name}_v{version}.jsonl")) and not args.regenerate:
            continue
        replies = chat().greedy(prompts, MAX_NEW["general"])
        _write_jsonl(os.path.join(OUT, f"general_{name}_v{version}.jsonl"),
                     [{"prompt": p, "response": r} for p, r in zip(prompts, replies) if r])
        print(f"general {name}: {len(prompts)} prompts answered in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)

    asked = collections.Counter(item["check"].get("rule", item["id"].split("-")[0]) for item in items)
    passed = collections.Counter(item["check"].get("rule", item["id"].split("-")[0]) for item in kept)
    print(f"# real_retention v{version}: SmolLM2-135M-Instruct, greedy, chat template, fp32 CPU")
    print(f"{'check':<14}{'asked':>7}{'kept':>6}")
    for name in sorted(asked):
        print(f"{name:<14}{asked[name]:>7}{passed[name]:>6}")
    print(f"{'total':<14}{sum(asked.values()):>7}{len(kept):>6}")
    print(f"general prompts: {len(evaluation)} for evaluation, {len(replay)} for replay; {time.perf_counter() - started:.0f} s in all")


if __name__ == "__main__":
    main()
