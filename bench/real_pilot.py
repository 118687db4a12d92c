"""Pilot for the forgetting study on a real model (SmolLM2-135M-Instruct): how often the base
already solves each candidate target skill, how fast our trainer runs on it, and how fast plain SFT
teaches a skill.

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
3. SFT pilot (``--sft-pilot``): can plain SFT teach a skill the base lacks within the study's budget?
   Per skill in ``--skills`` (default reverse_words and sort_numbers; igsm's base is above 10%):
   ``--examples`` chat records drawn with a seed other than the held-out items' (a draw equal to a
   held-out question is drawn again; the written file is checked against the held-out questions by
   set intersection), model.seq_length the shortest of 64/96/128 holding the longest example under
   the model's chat template, then ``anchor.objective=sft`` for ``--epochs`` epochs at TP=1 in one
   process (unpacked, Adam, constant ``--lr`` after a short warm-up, a checkpoint every epoch).
   Each epoch's checkpoint is exported to Hugging Face (fp32) and scored on the same held-out items
   as part 1, by the same code. The report gives per epoch: steps, wall seconds since the trainer's
   launch, the summed step times, the epoch's mean loss, exact match; then the mean step time, the
   start-up and save times, and the projected time of a 25-epoch run of the same size. Several
   ``--lr`` values run each skill once per value. The trainer checkpoints (about 2 GB each) live in
   a temporary directory and go when a skill is scored.

    .venv/bin/python bench/real_pilot.py [--items 100] [--train] [--output bench/results/real_pilot.txt]
    .venv/bin/python bench/real_pilot.py --skip-accuracy --sft-pilot [--skills reverse_words sort_numbers]
        [--examples 160] [--epochs 5] [--lr 5e-5] [--output bench/results/real_sft_pilot.txt]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import shutil
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


def heldout_items(skill: str, items: int) -> list[tuple[str, str, dict]]:
    """The held-out items of ``skill``: the same ones on every call (a string seed per skill)."""
    rng = random.Random(f"{SEED}-{skill}")
    return [CANDIDATES[skill][0](rng) for _ in range(items)]


def skill_accuracy(model_dir: str, skills: list[str], items: int, batch: int = 20) -> list[dict]:
    """Exact match of the model in ``model_dir`` (a Hugging Face directory with its tokenizer) on
    the held-out items of each skill: greedy, the model's chat template, one thread."""
    from anchored_megatron.eval.hf_chat import ChatModel

    chat = ChatModel(model_dir, threads=1)
    results = []
    for name in skills:
        _, score, max_new = CANDIDATES[name]
        cases = heldout_items(name, items)
        start = time.perf_counter()
        replies = chat.greedy([question for question, _, _ in cases], max_new, batch_size=batch)
        seconds = time.perf_counter() - start
        correct = [score(reply, answer) for reply, (_, answer, _) in zip(replies, cases)]
        row = {"skill": name, "items": items, "exact_match": sum(correct) / items, "seconds": seconds,
               "examples": [{"question": q, "answer": a, "reply": r} for (q, a, _), r in list(zip(cases, replies))[:3]]}
        if name == "igsm":
            row["canonical"] = sum(r == extra["solution"] for r, (_, _, extra) in zip(replies, cases)) / items
        results.append(row)
        print(f"{model_dir} {name}: exact match {100 * row['exact_match']:.0f}% in {seconds:.0f} s", file=sys.stderr, flush=True)
    return results


def training_examples(skill: str, count: int, seed: str, heldout: set[str]) -> tuple[list[tuple[str, str]], int]:
    """``count`` (question, answer) pairs drawn with ``seed``; a draw equal to a held-out question is
    drawn again. Returns the pairs and how many draws were replaced."""
    make = CANDIDATES[skill][0]
    rng = random.Random(seed)
    examples, redrawn = [], 0
    while len(examples) < count:
        question, answer, _ = make(rng)
        if question in heldout:
            redrawn += 1
            continue
        examples.append((question, answer))
    return examples, redrawn


def _write_sft_data(path: str, examples: list[tuple[str, str]]) -> None:
    with open(path, "w") as fh:
        for question, answer in examples:
            fh.write(json.dumps({"prompt": question, "response": answer}) + "\n")


def _run_trainer(name: str, out: str, hf_dir: str, mg_dir: str, data: str, settings: list[str]) -> dict:
    """One ``python -m anchored_megatron.train`` run at TP=1 in one process; its output lines are kept
    with the seconds since the start at which each arrived (a checkpoint's line dates its save)."""
    command = [sys.executable, "-m", "anchored_megatron.train", f"output_dir={out}", f"student.checkpoint={mg_dir}",
               f"data.paths=[{data}]", f"data.tokenizer={hf_dir}", "parallel.tp=1", "parallel.pp=1",
               "train.tensorboard=false", "train.progress_bar=false", "data.packing=false", *settings]
    start = time.perf_counter()
    lines = []
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                          env={**os.environ, "NO_VCS_VERSION": "1"}) as process:
        for line in process.stdout:
            lines.append((time.perf_counter() - start, line.rstrip("\n")))
            if "saved checkpoint" in line or "finished at step" in line:
                print(f"{name}: {line.strip()}", file=sys.stderr, flush=True)
    seconds = time.perf_counter() - start
    if process.returncode != 0:
        tail = "\n".join(line for _, line in lines[-60:])
        raise SystemExit(f"{name} run failed ({process.returncode}):\n{tail}")
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        steps = [record for record in map(json.loads, fh) if "step_time_s" in record]
    return {"run": name, "wall_s": seconds, "steps": steps, "lines": lines}


def _convert(hf_dir: str, work: str) -> tuple[str, float]:
    from anchored_megatron.convert import hf_to_megatron

    mg_dir = os.path.join(work, "megatron")
    start = time.perf_counter()
    hf_to_megatron(hf_dir, mg_dir, "fp32", show_progress=False)
    return mg_dir, time.perf_counter() - start


def _throughput_run(name: str, work: str, hf_dir: str, mg_dir: str, data: str, overrides: list[str]) -> dict:
    settings = ["model.seq_length=128", "train.micro_batch_size=2", "train.global_batch_size=8", "train.max_steps=4",
                "anchor.outer_iterations=1", "anchor.epochs_per_iteration=2", "optim.lr=1e-5", *overrides]
    run = _run_trainer(name, os.path.join(work, re.sub(r"\W+", "_", name)), hf_dir, mg_dir, data, settings)
    return {"run": name, "wall_s": run["wall_s"],
            "steps": [{k: s.get(k) for k in ("step", "loss", "step_time_s", "tokens_per_s", "frozen_cached")} for s in run["steps"]],
            "log": [line for _, line in run["lines"] if "tok/s" in line]}


def trainer_throughput(hf_dir: str, work: str, items: int) -> dict:
    mg_dir, convert_s = _convert(hf_dir, work)
    data = os.path.join(work, "reverse_words.jsonl")
    heldout = {question for question, _, _ in heldout_items("reverse_words", items)}
    _write_sft_data(data, training_examples("reverse_words", 16, f"{SEED}-train", heldout)[0])
    anchored = ["anchor.objective=anchored", f"reference.checkpoint={mg_dir}"]
    runs = [_throughput_run("sft", work, hf_dir, mg_dir, data, ["anchor.objective=sft"]),
            _throughput_run("anchored, frozen_hidden_cache", work, hf_dir, mg_dir, data, [*anchored, "train.frozen_hidden_cache=true"]),
            _throughput_run("anchored, no cache", work, hf_dir, mg_dir, data, anchored)]
    return {"convert_s": convert_s, "runs": runs}


SEQ_LENGTHS = (64, 96, 128)  # the shortest that holds the longest example is used


def _seq_length(hf_dir: str, examples: list[tuple[str, str]]) -> tuple[int, int]:
    """The longest example's token count under the model's chat template (a prompt-response pair,
    as the trainer renders it) and the shortest of SEQ_LENGTHS that holds it."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    longest = max(len(tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                                               tokenize=False), add_special_tokens=False)["input_ids"])
                  for q, a in examples)
    fitting = [length for length in SEQ_LENGTHS if length >= longest]
    if not fitting:
        raise SystemExit(f"--seq-length: the longest example has {longest} tokens, more than {SEQ_LENGTHS[-1]}; pass --seq-length")
    return longest, fitting[0]


def sft_run(hf_dir: str, mg_dir: str, work: str, skill: str, args: argparse.Namespace, lr: float) -> dict:
    """Plain SFT of the converted base on ``skill`` for ``args.epochs`` epochs, a checkpoint at every
    epoch's end; then each checkpoint exported to Hugging Face and scored on the held-out items."""
    from anchored_megatron.convert import megatron_to_hf

    heldout = {question for question, _, _ in heldout_items(skill, args.items)}
    examples, redrawn = training_examples(skill, args.examples, f"{SEED}-sft-{skill}", heldout)
    data = os.path.join(work, f"{skill}.jsonl")
    _write_sft_data(data, examples)
    with open(data) as fh:  # the check reads the file the trainer reads
        written = {json.loads(line)["prompt"] for line in fh}
    if written & heldout:
        raise SystemExit(f"{data}: {len(written & heldout)} training questions are held-out questions")
    longest, seq_length = _seq_length(hf_dir, examples)
    seq_length = args.seq_length or seq_length
    steps_per_epoch = args.examples // args.global_batch
    settings = [f"model.seq_length={seq_length}", "anchor.objective=sft", "anchor.outer_iterations=1",
                f"anchor.epochs_per_iteration={args.epochs}", f"train.micro_batch_size={args.micro_batch}",
                f"train.global_batch_size={args.global_batch}", f"train.save_interval={steps_per_epoch}",
                f"train.keep_checkpoints={args.epochs + 1}", f"optim.lr={lr}", "optim.lr_schedule=constant",
                f"optim.warmup_fraction={args.warmup_fraction}"]
    out = os.path.join(work, f"sft-{skill}-{lr:g}")
    run = _run_trainer(f"sft {skill} lr {lr:g}", out, hf_dir, mg_dir, data, settings)
    saved = [(seconds, int(match.group(1))) for seconds, line in run["lines"]
             if (match := re.search(r"saved checkpoint iter_(\d+)", line))]
    if [step for _, step in saved] != [steps_per_epoch * epoch for epoch in range(1, args.epochs + 1)]:
        raise SystemExit(f"{out}: checkpoints saved at steps {[step for _, step in saved]}, expected one per epoch of {steps_per_epoch} steps")
    # A step's log line arrives when the step ends, before that step's checkpoint is saved.
    step_ends = {int(match.group(1)): seconds for seconds, line in run["lines"]
                 if (match := re.search(r"\bstep (\d+)/\d+ iteration", line))}
    startup_s = step_ends[1] - run["steps"][0]["step_time_s"]
    save_s = [wall - step_ends[step] for wall, step in saved]
    epochs = []
    for epoch, (wall, step) in enumerate(saved, 1):
        export = os.path.join(work, f"hf-{skill}-{lr:g}-{epoch}")
        megatron_to_hf(out, export, "fp32", hf_config_source=hf_dir, tokenizer_dir=hf_dir, iteration=step, show_progress=False)
        score = skill_accuracy(export, [skill], args.items)[0]
        shutil.rmtree(export)
        in_epoch = [s for s in run["steps"] if step - steps_per_epoch < s["step"] <= step]
        epochs.append({"epoch": epoch, "steps": step, "wall_s": wall,
                       "step_s": sum(s["step_time_s"] for s in run["steps"] if s["step"] <= step),
                       "loss": sum(s["loss"] for s in in_epoch) / len(in_epoch), "exact_match": score["exact_match"],
                       "examples": score["examples"]})
    shutil.rmtree(out)  # the trainer checkpoints: about 2 GB each
    step_times = [s["step_time_s"] for s in run["steps"]]
    return {"skill": skill, "lr": lr, "examples": args.examples, "distinct": len({q for q, _ in examples}),
            "redrawn": redrawn, "heldout": len(heldout), "overlap": len(written & heldout), "longest": longest,
            "seq_length": seq_length, "steps_per_epoch": steps_per_epoch, "wall_s": run["wall_s"],
            "startup_s": startup_s, "mean_save_s": sum(save_s) / len(save_s),
            "mean_step_s": sum(step_times) / len(step_times),
            "mean_step_after_first_s": sum(step_times[1:]) / max(len(step_times) - 1, 1), "epochs": epochs}


def sft_pilot(hf_dir: str, work: str, args: argparse.Namespace) -> dict:
    mg_dir, convert_s = _convert(hf_dir, work)
    base = {row["skill"]: row["exact_match"] for row in skill_accuracy(hf_dir, args.skills, args.items)}
    runs = [sft_run(hf_dir, mg_dir, work, skill, args, lr) for lr in args.lr for skill in args.skills]
    return {"convert_s": convert_s, "base": base, "runs": runs}


def _uptime() -> str:
    with open("/proc/loadavg") as fh:
        return "load average " + " ".join(fh.read().split()[:3])


TARGET_BASE, TARGET_SFT, STUDY_EPOCHS = 0.10, 0.60, 25  # the study's bar: base at or under, SFT at or over; T x K


def _accuracy_lines(accuracy: list[dict]) -> list[str]:
    lines = ["", "## Base accuracy, greedy, chat template, transformers, torch.set_num_threads(1)",
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
    return lines


def _throughput_lines(training: dict) -> list[str]:
    lines = ["", "## Trainer throughput: TP=1, one process, seq 128, global batch 8, micro batch 2, 4 steps, fp32",
             f"hf-to-megatron: {training['convert_s']:.1f} s"]
    for run in training["runs"]:
        lines.append(f"{run['run']}: {run['wall_s']:.0f} s wall (start-up included)")
        for step in run["steps"]:
            cached = "" if step.get("frozen_cached") is None else f"  frozen_cached {step['frozen_cached']:.2f}"
            lines.append(f"  step {step['step']}: loss {step['loss']:.4f}  {step['step_time_s']:.1f} s  "
                         f"{step['tokens_per_s']:.0f} tokens/s{cached}")
        lines += [f"  | {line.strip()}" for line in run["log"][-1:]]
    return lines


def _sft_lines(pilot: dict, args: argparse.Namespace) -> list[str]:
    lines = ["", f"## SFT pilot: anchor.objective=sft, TP=1, one process, fp32, unpacked, global batch {args.global_batch}, "
                 f"micro batch {args.micro_batch}, Adam, constant LR after {args.warmup_fraction:g} of the steps as warm-up, "
                 f"{args.items} held-out items per skill scored as in the base accuracy",
             f"hf-to-megatron: {pilot['convert_s']:.1f} s",
             "wall s: seconds from the trainer's launch to the epoch's checkpoint line (start-up and saves included); "
             "step s: the sum of step times; loss: the epoch's mean training loss; epoch 0 is the base",
             f"{'skill':<15}{'lr':>8}{'epoch':>6}{'steps':>6}{'wall s':>8}{'step s':>8}{'loss':>8}{'exact match':>13}"]
    for run in pilot["runs"]:
        lines.append(f"{run['skill']:<15}{run['lr']:>8g}{0:>6}{0:>6}{'':>8}{'':>8}{'':>8}{100 * pilot['base'][run['skill']]:>12.0f}%")
        for e in run["epochs"]:
            lines.append(f"{run['skill']:<15}{run['lr']:>8g}{e['epoch']:>6}{e['steps']:>6}{e['wall_s']:>8.0f}{e['step_s']:>8.0f}"
                         f"{e['loss']:>8.4f}{100 * e['exact_match']:>12.0f}%")
    for run in pilot["runs"]:
        steps = STUDY_EPOCHS * run["steps_per_epoch"]
        best = max(run["epochs"], key=lambda e: e["exact_match"])
        base = pilot["base"][run["skill"]]
        meets = base <= TARGET_BASE and best["exact_match"] >= TARGET_SFT
        lines += [
            "", f"{run['skill']}, lr {run['lr']:g}:",
            f"  data: {run['examples']} examples ({run['distinct']} distinct questions), seed {SEED}-sft-{run['skill']}; "
            f"training questions that are held-out questions: {run['overlap']} (set intersection with the {run['heldout']} "
            f"held-out questions, seed {SEED}-{run['skill']}); draws redrawn for equalling a held-out question: {run['redrawn']}",
            f"  longest example {run['longest']} tokens (chat template) -> seq_length {run['seq_length']}; "
            f"{run['steps_per_epoch']} steps an epoch",
            f"  mean step time {run['mean_step_s']:.2f} s ({run['mean_step_after_first_s']:.2f} s without step 1); "
            f"start-up {run['startup_s']:.0f} s; a checkpoint save {run['mean_save_s']:.0f} s (mean); "
            f"trainer wall {run['wall_s']:.0f} s for {len(run['epochs'])} epochs",
            f"  projected {STUDY_EPOCHS} epochs ({steps} steps): {steps * run['mean_step_after_first_s'] / 60:.1f} min of steps; "
            f"{(run['startup_s'] + steps * run['mean_step_after_first_s'] + STUDY_EPOCHS * run['mean_save_s']) / 60:.1f} min "
            "with the start-up and a save every epoch",
            f"  base {100 * base:.0f}%, best epoch {best['epoch']} at {100 * best['exact_match']:.0f}%: "
            f"{'meets' if meets else 'does not meet'} the bar (base <= {100 * TARGET_BASE:.0f}%, SFT >= {100 * TARGET_SFT:.0f}%)",
            "  last epoch's replies:"]
        for example in run["epochs"][-1]["examples"]:
            lines.append(f"    Q: {example['question']}\n    expected: {example['answer']}\n    reply: {json.dumps(example['reply'])}")
    return lines


def report(accuracy: list[dict], training: dict | None, pilot: dict | None, args: argparse.Namespace, load: list[str]) -> str:
    lines = [f"# real_pilot  {datetime.date.today().isoformat()}",
             "SmolLM2-135M-Instruct (make real-model; Q4_1 GGUF dequantized to fp32), CPU, "
             f"{os.cpu_count()} cores (shared); {'; '.join(load)}"]
    if accuracy:
        lines += _accuracy_lines(accuracy)
    if training is not None:
        lines += _throughput_lines(training)
    if pilot is not None:
        lines += _sft_lines(pilot, args)
    return "\n".join(lines) + "\n"


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=100, help="held-out items per skill")
    parser.add_argument("--train", action="store_true", help="also measure the trainer's throughput (part 2)")
    parser.add_argument("--skip-accuracy", action="store_true", help="skip part 1")
    parser.add_argument("--sft-pilot", action="store_true", help="also run the SFT pilot (part 3)")
    parser.add_argument("--skills", nargs="+", default=["reverse_words", "sort_numbers"], choices=list(CANDIDATES),
                        help="SFT pilot: the skills to train, one run each")
    parser.add_argument("--examples", type=int, default=160, help="SFT pilot: training examples per skill")
    parser.add_argument("--epochs", type=int, default=5, help="SFT pilot: epochs, a checkpoint scored after each")
    parser.add_argument("--lr", type=float, nargs="+", default=[5e-5], help="SFT pilot: learning rates, one run per skill each")
    parser.add_argument("--seq-length", type=int, default=None,
                        help=f"SFT pilot: default the shortest of {SEQ_LENGTHS} that holds the longest example")
    parser.add_argument("--global-batch", type=int, default=8, help="SFT pilot: sequences a step")
    parser.add_argument("--micro-batch", type=int, default=8, help="SFT pilot: sequences a forward pass")
    parser.add_argument("--warmup-fraction", type=float, default=0.02, help="SFT pilot: of the run's steps")
    parser.add_argument("--output", default=None, help="also write the report here")
    args = parser.parse_args()
    for name in ("items", "examples", "epochs", "global_batch", "micro_batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.sft_pilot and args.examples % args.global_batch:
        parser.error(f"--examples {args.examples} must be a multiple of --global-batch {args.global_batch} "
                     "(a checkpoint at every epoch's end)")
    return args


def main() -> None:
    args = _arguments()
    from anchored_megatron.convert.fetch_smollm2 import fetch

    hf_dir = fetch()
    load = [f"start: {_uptime()}"]
    accuracy = [] if args.skip_accuracy else skill_accuracy(hf_dir, list(CANDIDATES), args.items)
    training = pilot = None
    if accuracy:
        load.append(f"after accuracy: {_uptime()}")
    if args.train:
        with tempfile.TemporaryDirectory(prefix="real-pilot-") as work:
            training = trainer_throughput(hf_dir, work, args.items)
        load.append(f"after training: {_uptime()}")
    if args.sft_pilot:
        with tempfile.TemporaryDirectory(prefix="real-sft-pilot-") as work:
            pilot = sft_pilot(hf_dir, work, args)
        load.append(f"after the SFT pilot: {_uptime()}")
    text = report(accuracy, training, pilot, args, load)
    print(text)
    if args.output:
        with open(args.output, "w") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
