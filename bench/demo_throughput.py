"""Trainer throughput at the demo's sizes: TP=2 (2 gloo ranks x 1 thread) vs TP=1 (1 rank x 2
threads), measured side by side in one run on the data of the demo's base job (regime A, packed
sequences). Each case trains ``--steps`` steps through the real trainer; the first
``--warmup`` steps are dropped; step time is the median of the rest (from metrics.jsonl).

    python bench/demo_throughput.py [--steps 14] [--warmup 4]

Prints one line per case and the TP=2 / TP=1 step-time ratio; appends them to bench/results/demo_throughput.txt.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CASES = [  # (label, model overrides, global batch, micro batch)
    ("h64x2 gb64 mb16", dict(hidden_size=64, num_layers=2, ffn_hidden_size=192), 64, 16),
    ("h64x2 gb64 mb64", dict(hidden_size=64, num_layers=2, ffn_hidden_size=192), 64, 64),
    ("h64x2 gb128 mb128", dict(hidden_size=64, num_layers=2, ffn_hidden_size=192), 128, 128),
    ("h128x2 gb64 mb16 (the demo)", dict(hidden_size=128, num_layers=2, ffn_hidden_size=384), 64, 16),
    ("h128x2 gb64 mb64", dict(hidden_size=128, num_layers=2, ffn_hidden_size=384), 64, 64),
    ("h128x4 gb64 mb64", dict(hidden_size=128, num_layers=4, ffn_hidden_size=384), 64, 64),
]


def train_on_rank(run: dict) -> dict:
    from anchored_megatron.config import RunConfig, build
    from anchored_megatron.training.trainer import Trainer

    cfg = build(RunConfig, run)
    trainer = Trainer(cfg)
    trainer.setup()
    trainer.run()
    return {}


def measure(run: dict, tp: int, steps: int, warmup: int) -> dict:
    from anchored_megatron.platform import run_on_ranks

    run = copy.deepcopy(run)
    run["parallel"] = {"tp": tp}
    run["train"]["max_steps"] = steps
    run["train"]["progress_bar"] = False
    run_on_ranks(train_on_rank, tp, run, timeout=900, threads=max(1, 2 // tp))
    with open(os.path.join(run["output_dir"], "metrics.jsonl"), encoding="utf-8") as fh:
        records = [json.loads(line) for line in fh if line.strip()][warmup:]
    step = statistics.median(r["step_time_s"] for r in records)
    spread = (min(r["step_time_s"] for r in records), max(r["step_time_s"] for r in records))
    return {"step_s": step, "min": spread[0], "max": spread[1], "tokens_per_s": run["train"]["global_batch_size"] * run["model"]["seq_length"] / step}


def main(argv=None) -> int:
    from anchored_megatron.demo import DEMO
    from anchored_megatron.experiment.jobs import ExperimentConfig
    from anchored_megatron.experiment.runner import prepare_jobs

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=14)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--cases", default="", help="comma-separated case indices (default: all)")
    args = parser.parse_args(argv)
    work = tempfile.mkdtemp(prefix="demo-throughput-")
    cfg = ExperimentConfig(output_dir=work, **dict(DEMO, micro_batch_size=16, base_global_batch=64))
    base_run = prepare_jobs(cfg)[0][0].run
    lines = [f"{datetime.datetime.now():%Y-%m-%d %H:%M} demo_throughput: base-job SFT, regime A data, seq {cfg.seq_length}, "
             f"{args.steps} steps, first {args.warmup} dropped, median step time (min-max); load avg {os.getloadavg()[0]:.1f} at start"]
    print(lines[0], flush=True)
    chosen = [CASES[int(i)] for i in args.cases.split(",")] if args.cases else CASES
    for label, model, gb, mb in chosen:
        run = copy.deepcopy(base_run)
        run["model"].update(model)
        run["train"].update(global_batch_size=gb, micro_batch_size=mb, log_interval=1000000)
        row = {}
        for tp in (2, 1):
            run["output_dir"] = os.path.join(work, f"case{CASES.index((label, model, gb, mb))}_tp{tp}")
            row[tp] = measure(run, tp, args.steps, args.warmup)
        text = (f"{label}: " + "; ".join(
            f"TP={tp} {r['step_s']:.3f} s/step ({r['min']:.3f}-{r['max']:.3f}), {1 / r['step_s']:.1f} steps/s, {r['tokens_per_s']:.0f} tok/s"
            for tp, r in row.items()) + f"; TP2/TP1 step time {row[2]['step_s'] / row[1]['step_s']:.2f}x")
        print(text, flush=True)
        lines.append(text)
    lines.append(f"load avg at end {os.getloadavg()[0]:.1f}")
    os.makedirs(os.path.join("bench", "results"), exist_ok=True)
    with open(os.path.join("bench", "results", "demo_throughput.txt"), "a", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
