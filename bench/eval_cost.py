"""What evaluation during training (``eval.*``) costs: the anchored objective with and without it.

One process (TP=1, CPU), a 4-layer hidden-256 Llama built offline (a teacher unlike it as the
reference), a sentencepiece tokenizer and SFT data generated here. Runs without evaluation and
with ``eval.paths`` + ``eval.general_paths`` at each ``--intervals`` value, interleaved over
``--rounds`` rounds (plain, every I1, every I2, plain, ...) so that machine load hits them alike.
Reports the mean training step (steps 3.. of metrics.jsonl's ``step_time_s``), the time of one
evaluation (``eval_time_s``), the evaluations' time as a share of the training steps' time over
the run and per evaluation in training steps, the base-state cache the run logs (its hidden states
also computed from the shapes), the capture's wall time, and checks that the training records of
every run with evaluation equal those of the run without.

    .venv/bin/python bench/eval_cost.py [--quick] [--steps 16] [--rounds 2] [--intervals 4,16]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import random
import re
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

HIDDEN, LAYERS, FFN, SEQ, VOCAB = 256, 4, 768, 128, 512
MICRO, GLOBAL = 2, 8
# The fields of a training record that must not move when evaluation is switched on.
TRAJECTORY = ("loss", "kl_step", "kl_reference", "grad_norm")
CAPTURE_LINE = re.compile(r"eval: the base's final hidden states over (\d+) general microbatches per rank kept in host memory "
                          r"\(([\d.]+) MiB on this rank\) with its output-weight shard \(([\d.]+) MiB\), in ([\d.]+) s")


def _words(rng: random.Random, count: int) -> list[str]:
    syllables = "ka lo mi ne su ta ri po ve da zu fi ho ga be ny".split()
    return sorted({"".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(count * 3)})[:count]


def build_setting(root: str, train_records: int, eval_records: int) -> dict:
    """Tokenizer, base and teacher checkpoints (converted from random HF Llamas), and three disjoint
    jsonl files: training, held-out target (same words) and general (other words)."""
    from anchored_megatron.convert import hf_to_megatron
    from anchored_megatron.data.train_tokenizer import main as train_tokenizer
    from tests.convert.helpers import make_hf_model

    rng = random.Random(0)
    words = _words(rng, 240)
    target_words, general_words = words[:160], words[160:]
    corpus = os.path.join(root, "corpus.txt")
    with open(corpus, "w") as fh:
        fh.write("\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(3000)) + "\nUser: Assistant: System:\n")
    tokenizer = os.path.join(root, "tok")
    with contextlib.redirect_stdout(sys.stderr):  # stdout holds the table alone
        if train_tokenizer(["--input", corpus, "--vocab-size", str(VOCAB), "--output", tokenizer]) != 0:
            raise SystemExit("tokenizer training failed")
    shape = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS, num_attention_heads=8,
                 num_key_value_heads=4, max_position_embeddings=SEQ, tie_word_embeddings=True)
    # A teacher unlike the base, so that the anchored steps move the student.
    for name, seed in (("base", 4), ("teacher", 9)):
        make_hf_model("llama", os.path.join(root, f"hf_{name}"), seed=seed, **shape)
        hf_to_megatron(os.path.join(root, f"hf_{name}"), os.path.join(root, name), "fp32", show_progress=False)

    def record(pool):
        return {"prompt": " ".join(rng.choice(pool) for _ in range(rng.randint(4, 12))),
                "response": " ".join(rng.choice(pool) for _ in range(rng.randint(8, 24)))}

    paths = {}
    seen = set()
    for name, pool, count in (("train", target_words, train_records), ("target", target_words, eval_records),
                              ("general", general_words, eval_records)):
        rows = []
        while len(rows) < count:
            row = record(pool)
            if json.dumps(row) not in seen:  # held-out data must not overlap the training data
                seen.add(json.dumps(row))
                rows.append(row)
        paths[name] = os.path.join(root, f"{name}.jsonl")
        with open(paths[name], "w") as fh:
            fh.write("".join(json.dumps(r) + "\n" for r in rows))
    return {"root": root, "tokenizer": tokenizer, **paths}


def run_config(setting: dict, output_dir: str, steps: int, interval: int | None) -> dict:
    root = setting["root"]
    cfg = {
        "output_dir": output_dir, "seed": 5,
        "model": {"seq_length": SEQ},
        "student": {"checkpoint": os.path.join(root, "base")},
        "reference": {"checkpoint": os.path.join(root, "teacher")},
        "data": {"paths": [setting["train"]], "tokenizer": setting["tokenizer"], "cache_dir": os.path.join(root, "cache"), "packing": False},
        "anchor": {"objective": "anchored", "alpha": 0.5, "outer_iterations": 1, "epochs_per_iteration": 1},
        "optim": {"lr": 1e-3, "warmup_fraction": 0.0},
        "train": {"micro_batch_size": MICRO, "global_batch_size": GLOBAL, "max_steps": steps, "save_at_iteration_end": False,
                  "keep_checkpoints": 1, "progress_bar": False, "tensorboard": False},
    }
    if interval is not None:
        cfg["eval"] = {"paths": [setting["target"]], "general_paths": [setting["general"]], "interval": interval}
    return cfg


def _train_rank(cfg_dict: dict) -> None:
    """One run; its lines go to its train.log only, where read_run finds them."""
    from anchored_megatron.config import RunConfig, build
    from anchored_megatron.training.trainer import train

    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
        train(build(RunConfig, cfg_dict))


def read_run(output_dir: str) -> dict:
    with open(os.path.join(output_dir, "metrics.jsonl")) as fh:
        rows = [json.loads(line) for line in fh]
    with open(os.path.join(output_dir, "train.log")) as fh:
        capture = CAPTURE_LINE.search(fh.read())
    return {"train": [r for r in rows if r.get("record") != "eval"], "eval": [r for r in rows if r.get("record") == "eval"],
            "capture": capture.groups() if capture else None}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 steps, one round, intervals 4,8 (a smoke run)")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--intervals", default="4,16")
    parser.add_argument("--eval-records", type=int, default=32, help="records in each held-out set (target, general)")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.rounds, args.intervals = 8, 1, "4,8"
    intervals = [int(i) for i in args.intervals.split(",")]

    from anchored_megatron.platform import run_on_ranks

    load_start = os.getloadavg()
    root = tempfile.mkdtemp(prefix="eval-cost-")
    setting = build_setting(root, train_records=GLOBAL * args.steps + 16, eval_records=args.eval_records)
    variants = [None] + intervals  # None: no evaluation
    runs = {v: [] for v in variants}
    for round_index in range(args.rounds):
        # Odd rounds in reverse order (a b c c b a ...): a load that drifts within a round evens out.
        for interval in variants if round_index % 2 == 0 else variants[::-1]:
            out = os.path.join(root, f"{'plain' if interval is None else f'every{interval}'}_{round_index}")
            started = time.perf_counter()
            run_on_ranks(_train_rank, 1, run_config(setting, out, args.steps, interval), timeout=1800)
            runs[interval].append({**read_run(out), "wall_s": time.perf_counter() - started, "round": round_index,
                                   "interval": interval, "order": sum(len(group) for group in runs.values())})
            print(f"round {round_index + 1}/{args.rounds}, eval.interval {interval or 'none'}: {runs[interval][-1]['wall_s']:.0f} s",
                  file=sys.stderr, flush=True)

    shutil.rmtree(root)

    # The trajectory: every run's training records against the first run without evaluation.
    reference = runs[None][0]["train"]
    mismatches = []
    for interval in variants:
        for index, run in enumerate(runs[interval]):
            if [r["step"] for r in run["train"]] != [r["step"] for r in reference]:
                mismatches.append(f"{interval} round {index}: steps {[r['step'] for r in run['train']]}")
                continue
            for a, b in zip(run["train"], reference):
                mismatches += [f"interval {interval} round {index} step {a['step']} {name}: {a[name]!r} != {b[name]!r}"
                               for name in TRAJECTORY if a.get(name) != b.get(name)]

    def mean_step(run):
        return statistics.fmean(r["step_time_s"] for r in run["train"][2:])

    plain_step = statistics.fmean(mean_step(run) for run in runs[None])
    lines = [
        f"# eval_cost {datetime.date.today().isoformat()}",
        f"anchored objective (snapshot anchor + teacher reference, alpha 0.5), model {LAYERS} layers x hidden {HIDDEN} (ffn {FFN}), "
        f"vocab {VOCAB}, seq {SEQ}, fp32, global batch {GLOBAL} (micro {MICRO}), TP=1, one process, {os.cpu_count()} CPU cores; "
        f"{args.steps} steps per run; held-out sets: {args.eval_records} target + {args.eval_records} general records, one "
        f"sequence each (no packing); {args.rounds} interleaved round(s), odd ones in reverse order; load average {load_start[0]:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end",
        "step time = mean of steps 3..N; evaluations run at step 0, every I steps and at the run's end; "
        "means over rounds",
        "",
        "| eval.interval | run wall (s) | step time (s) | vs no eval | evaluations | eval at step 0 (s) | eval, later (s) "
        "| eval / step | sum eval / sum steps | steady share: (eval / step) / I |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for interval in variants:
        group = runs[interval]
        wall = statistics.fmean(run["wall_s"] for run in group)
        step = statistics.fmean(mean_step(run) for run in group)
        if interval is None:
            lines.append(f"| none | {wall:.1f} | {step:.3f} | 1.00x | 0 | | | | | |")
            continue
        first = statistics.fmean(run["eval"][0]["eval_time_s"] for run in group)
        later = statistics.fmean(r["eval_time_s"] for run in group for r in run["eval"][1:])
        share = statistics.fmean(sum(r["eval_time_s"] for r in run["eval"]) / sum(r["step_time_s"] for r in run["train"]) for run in group)
        in_steps = later / step
        lines.append(f"| {interval} | {wall:.1f} | {step:.3f} | {step / plain_step:.2f}x | {len(group[0]['eval'])} | {first:.2f} | "
                     f"{later:.2f} | {in_steps:.2f} | {share:.1%} | {in_steps / interval:.1%} |")

    lines += ["", "per run, in the order run:", "",
              "| round | eval.interval | run wall (s) | step time (s) | eval at step 0 (s) | eval, later (s) | capture (s) |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for run in sorted((run for group in runs.values() for run in group), key=lambda run: run["order"]):
        evals = run["eval"]
        first = f"{evals[0]['eval_time_s']:.2f}" if evals else ""
        later = f"{statistics.fmean(r['eval_time_s'] for r in evals[1:]):.2f}" if len(evals) > 1 else ""
        capture = run["capture"][3] if run["capture"] else ""
        lines.append(f"| {run['round'] + 1} | {run['interval'] or 'none'} | {run['wall_s']:.1f} | {mean_step(run):.3f} | "
                     f"{first} | {later} | {capture} |")

    capture = runs[intervals[0]][0]["capture"]
    general_microbatches = -(-args.eval_records // MICRO)
    computed = general_microbatches * MICRO * SEQ * HIDDEN * 4
    lines.append("")
    if capture is None:
        lines.append("base-state cache: the run's train.log has no capture line")
    else:
        microbatches, hidden_mib, weight_mib, _ = capture
        captures = [float(run["capture"][3]) for v in intervals for run in runs[v] if run["capture"]]
        lines.append(f"base-state cache (from train.log): final hidden states of {microbatches} general microbatches, {hidden_mib} MiB "
                     f"(computed: {general_microbatches} x {MICRO} sequences x {SEQ} tokens x hidden {HIDDEN} x 4 bytes = "
                     f"{computed / 2**20:.1f} MiB), output-weight shard {weight_mib} MiB (vocab {VOCAB} x hidden {HIDDEN} x 4 bytes = "
                     f"{VOCAB * HIDDEN * 4 / 2**20:.1f} MiB); capture wall time {statistics.fmean(captures):.2f} s "
                     f"(mean of {len(captures)} runs, min {min(captures):.2f}, max {max(captures):.2f})")
    checked = sum(len(runs[v]) for v in variants)
    if mismatches:
        lines.append(f"training records with evaluation vs without: DIFFER ({len(mismatches)} fields)")
        lines += ["  " + m for m in mismatches[:20]]
    else:
        lines.append(f"training records with evaluation vs without: identical ({', '.join(TRAJECTORY)}; {checked} runs x "
                     f"{len(reference)} steps, compared exactly)")
    print("\n".join(lines))
    return 1 if mismatches else 0


if __name__ == "__main__":
    raise SystemExit(main())
