"""Pilot for the forgetting study on a real model (SmolLM2-135M-Instruct): how often the base
already solves each candidate target skill, and how fast our trainer runs on it.

1. Base accuracy: 100 held-out items per candidate skill, asked in chat format through the
   model's own template, greedy answers from transformers on CPU (one thread), scored by exact
   match of the final answer. A candidate is a good target when the base is at <= 10%.
   - igsm: the synthetic target (data/synthetic/target.py, 2-3 steps, arithmetic mod 10) as a chat
     question; the final answer is the number after the last '#', else the last number in the
     reply (a guessed digit is right 10% of the time). `canonical` counts replies equal to the worked solution the SFT data would
     teach (``x=3+4=7,k=7*3=1#1``).
   - reverse_words: reverse the order of 4-6 common words (case and punctuation ignored).
   - sort_numbers: sort 5 distinct two-digit numbers ascending (the numbers in the reply, in order).
2. Trainer throughput (``--train``): convert the model, then 4 steps of ``python -m
   anchored_megatron.train`` at TP=1 in one process (seq 128, global batch 8, micro batch 2):
   SFT, and anchored with the converted base as its own teacher (its loss starts at 0: this times
   the machinery, it teaches nothing), with ``train.frozen_hidden_cache`` and without it, side by
   side. 16 unpacked examples make 2 steps an epoch, so steps 3-4 read the frozen roles from the
   cache. The first anchored step includes the loss kernels' compile or their load from the cache.

    .venv/bin/python bench/real_pilot.py [--items 100] [--train] [--output bench/results/real_pilot.txt]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

WORDS = ("apple river stone cloud lamp garden window bread candle forest mirror pencil ocean bridge "
         "tiger violin basket rocket orange silver planet coffee ladder jacket winter thunder island "
         "doctor camera pillow turtle market").split()
SEED = "real-pilot-heldout"  # a string seed: the same items on every Python and platform


def _igsm(rng: random.Random) -> tuple[str, str, dict]:
    from anchored_megatron.data.synthetic.target import TargetTask

    task = TargetTask(2, 3)
    prompt = task.make_prompt(rng)
    *definitions, question = prompt[:-1].split(",")
    text = (f"All arithmetic is modulo 10 (keep only the last digit). {', '.join(definitions)}. What is {question}? "
            "Work it out step by step, then give the final answer as a single digit after '#'.")
    return text, str(task.answer(prompt)), {"solution": task.solution(prompt)}


def _reverse_words(rng: random.Random) -> tuple[str, str, dict]:
    words = rng.sample(WORDS, rng.randint(4, 6))
    return f"Reverse the order of these words: {' '.join(words)}", " ".join(reversed(words)), {}


def _sort_numbers(rng: random.Random) -> tuple[str, str, dict]:
    numbers = rng.sample(range(10, 100), 5)
    return (f"Sort these numbers from smallest to largest: {', '.join(map(str, numbers))}",
            ", ".join(map(str, sorted(numbers))), {})


def _final_answer(reply: str) -> str | None:
    """The number after the last '#', else the last number in the reply (a rambling "150" is not "0")."""
    numbers = re.findall(r"#\s*(\d+)", reply) or re.findall(r"\d+", reply)
    return numbers[-1] if numbers else None


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


# name -> (item maker, scorer(reply, answer) -> bool, max new tokens)
CANDIDATES = {
    "igsm": (_igsm, lambda reply, answer: _final_answer(reply) == answer, 160),
    "reverse_words": (_reverse_words, lambda reply, answer: _words(reply) == answer.split(), 40),
    "sort_numbers": (_sort_numbers, lambda reply, answer: re.findall(r"\d+", reply) == answer.split(", "), 48),
}


def base_accuracy(hf_dir: str, items: int, batch: int = 20) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    tokenizer.padding_side = "left"  # greedy batches: every prompt ends where generation starts
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    results = []
    for name, (make, score, max_new) in CANDIDATES.items():
        rng = random.Random(f"{SEED}-{name}")
        cases = [make(rng) for _ in range(items)]
        start = time.perf_counter()
        replies = []
        for first in range(0, items, batch):
            chats = [[{"role": "user", "content": question}] for question, _, _ in cases[first:first + batch]]
            texts = [tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) for chat in chats]
            encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                out = model.generate(**encoded, max_new_tokens=max_new, do_sample=False,
                                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
            replies += tokenizer.batch_decode(out[:, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
        seconds = time.perf_counter() - start
        correct = [score(reply.strip(), answer) for reply, (_, answer, _) in zip(replies, cases)]
        row = {"skill": name, "items": items, "exact_match": sum(correct) / items, "seconds": seconds,
               "examples": [{"question": q, "answer": a, "reply": r.strip()} for (q, a, _), r in list(zip(cases, replies))[:3]]}
        if name == "igsm":
            row["canonical"] = sum(r.strip() == extra["solution"] for r, (_, _, extra) in zip(replies, cases)) / items
        results.append(row)
        print(f"{name}: exact match {100 * row['exact_match']:.0f}% in {seconds:.0f} s", file=sys.stderr, flush=True)
    return results


def _write_sft_data(path: str, examples: int) -> None:
    rng = random.Random(f"{SEED}-train")
    with open(path, "w") as fh:
        for _ in range(examples):
            question, answer, _ = _reverse_words(rng)
            fh.write(json.dumps({"prompt": question, "response": answer}) + "\n")


def _train(name: str, work: str, hf_dir: str, mg_dir: str, data: str, overrides: list[str]) -> dict:
    out = os.path.join(work, re.sub(r"\W+", "_", name))
    command = [sys.executable, "-m", "anchored_megatron.train", f"output_dir={out}", f"student.checkpoint={mg_dir}",
               f"data.paths=[{data}]", f"data.tokenizer={hf_dir}", "model.seq_length=128", "parallel.tp=1", "parallel.pp=1",
               "train.micro_batch_size=2", "train.global_batch_size=8", "train.max_steps=4", "train.tensorboard=false",
               "data.packing=false", "anchor.outer_iterations=1", "anchor.epochs_per_iteration=2", "optim.lr=1e-5", *overrides]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "NO_VCS_VERSION": "1"})
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{name} run failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        steps = [json.loads(line) for line in fh]
    lines = [line for line in result.stdout.splitlines() + result.stderr.splitlines() if "tok/s" in line]
    return {"run": name, "wall_s": seconds, "steps": [{k: s.get(k) for k in ("step", "loss", "step_time_s", "tokens_per_s", "frozen_cached")} for s in steps],
            "log": lines}


def trainer_throughput(hf_dir: str, work: str) -> dict:
    from anchored_megatron.convert import hf_to_megatron

    mg_dir = os.path.join(work, "megatron")
    start = time.perf_counter()
    hf_to_megatron(hf_dir, mg_dir, "fp32", show_progress=False)
    convert_s = time.perf_counter() - start
    data = os.path.join(work, "reverse_words.jsonl")
    _write_sft_data(data, 16)
    anchored = ["anchor.objective=anchored", f"reference.checkpoint={mg_dir}"]
    runs = [_train("sft", work, hf_dir, mg_dir, data, ["anchor.objective=sft"]),
            _train("anchored, frozen_hidden_cache", work, hf_dir, mg_dir, data, [*anchored, "train.frozen_hidden_cache=true"]),
            _train("anchored, no cache", work, hf_dir, mg_dir, data, anchored)]
    return {"convert_s": convert_s, "runs": runs}


def _uptime() -> str:
    with open("/proc/loadavg") as fh:
        return "load average " + " ".join(fh.read().split()[:3])


def report(accuracy: list[dict], training: dict | None, load: list[str]) -> str:
    lines = [f"# real_pilot  {datetime.date.today().isoformat()}",
             "SmolLM2-135M-Instruct (make real-model; Q4_1 GGUF dequantized to fp32), CPU, "
             f"{os.cpu_count()} cores (shared); {'; '.join(load)}", "",
             "## Base accuracy, greedy, chat template, transformers, torch.set_num_threads(1)",
             f"{'skill':<15}{'items':>6}{'exact match':>13}{'seconds':>9}"]
    for row in accuracy:
        lines.append(f"{row['skill']:<15}{row['items']:>6}{100 * row['exact_match']:>12.0f}%{row['seconds']:>9.0f}")
    for row in accuracy:
        if "canonical" in row:
            lines.append(f"{row['skill']}: replies equal to the canonical worked solution: {100 * row['canonical']:.0f}%")
    for row in accuracy:
        lines.append(f"\n{row['skill']} examples:")
        for example in row["examples"]:
            lines.append(f"  Q: {example['question']}\n  expected: {example['answer']}\n  reply: {json.dumps(example['reply'])}")
    if training is not None:
        lines += ["", "## Trainer throughput: TP=1, one process, seq 128, global batch 8, micro batch 2, 4 steps, fp32",
                  f"hf-to-megatron: {training['convert_s']:.1f} s"]
        for run in training["runs"]:
            lines.append(f"{run['run']}: {run['wall_s']:.0f} s wall (start-up included)")
            for step in run["steps"]:
                cached = "" if step.get("frozen_cached") is None else f"  frozen_cached {step['frozen_cached']:.2f}"
                lines.append(f"  step {step['step']}: loss {step['loss']:.4f}  {step['step_time_s']:.1f} s  "
                             f"{step['tokens_per_s']:.0f} tokens/s{cached}")
            lines += [f"  | {line.strip()}" for line in run["log"][-1:]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=100)
    parser.add_argument("--train", action="store_true", help="also measure the trainer's throughput (part 2)")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--output", default=None, help="also write the report here")
    args = parser.parse_args()
    from anchored_megatron.convert.fetch_smollm2 import fetch

    hf_dir = fetch()
    load = [f"start: {_uptime()}"]
    accuracy = [] if args.skip_accuracy else base_accuracy(hf_dir, args.items)
    load.append(f"after accuracy: {_uptime()}")
    training = None
    if args.train:
        with tempfile.TemporaryDirectory(prefix="real-pilot-") as work:
            training = trainer_throughput(hf_dir, work)
        load.append(f"after training: {_uptime()}")
    text = report(accuracy, training, load)
    print(text)
    if args.output:
        with open(args.output, "w") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
