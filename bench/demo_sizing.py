"""Size the demo's base: train ONLY the base job (TP=2, real trainer) at given sizes and
evaluate it (greedy, held-out items), printing train time, steps and per-skill accuracy.

    python bench/demo_sizing.py key=value ...   (ExperimentConfig fields; tuples as a,b,c)

Appends one line per run to bench/results/demo_sizing.txt.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from dataclasses import fields

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse(argv: list[str]) -> dict:
    from anchored_megatron.demo import DEMO
    from anchored_megatron.experiment.jobs import ExperimentConfig

    types = {f.name: f.type for f in fields(ExperimentConfig)}
    sizes = dict(DEMO)
    for item in argv:
        key, value = item.split("=", 1)
        if key not in types:
            raise SystemExit(f"unknown option {key!r}")
        kind = str(types[key])
        sizes[key] = tuple(value.split(",")) if "tuple" in kind else int(value) if kind == "int" else float(value) if kind == "float" else value
    return sizes


def main(argv=None) -> int:
    from anchored_megatron.experiment.jobs import ExperimentConfig
    from anchored_megatron.experiment.runner import prepare_jobs, run_jobs

    argv = sys.argv[1:] if argv is None else argv
    sizes = parse(argv)
    out = os.path.join("runs", "sizing", "_".join(a.replace("=", "").replace(",", "-") for a in argv)[:120] or "default")
    cfg = ExperimentConfig(output_dir=out, progress_bar=False, **sizes)
    jobs, paths, eval_cfg = prepare_jobs(cfg, max_new_tokens=32)
    started = time.perf_counter()
    result = run_jobs(jobs[:1], paths, eval_cfg, cfg.tp, timeout=3600)["base"]
    wall = time.perf_counter() - started
    point = result["points"][-1]
    acc = point["accuracy"]
    general = sum(v for k, v in acc.items() if k != "target") / (len(acc) - 1)
    line = (f"{datetime.datetime.now():%Y-%m-%d %H:%M} {' '.join(argv)} | steps {result['train']['total_steps']} "
            f"({result['train']['steps_per_epoch']}/epoch), train {result['train']['train_seconds']:.0f} s, eval {result['eval_seconds']:.0f} s, "
            f"launch wall {wall:.0f} s | general {general:.3f} | " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items())
            + f", target answer {point['target_answer']:.3f} | load {os.getloadavg()[0]:.1f}")
    print(line, flush=True)
    for task, samples in point["samples"].items():
        print(f"  {task}: {samples[:2]}")
    os.makedirs(os.path.join("bench", "results"), exist_ok=True)
    with open(os.path.join("bench", "results", "demo_sizing.txt"), "a", encoding="utf-8") as fh:
        fh.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
