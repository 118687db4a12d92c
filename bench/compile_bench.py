"""First-step time of an anchored run: compile cache cold, the same cache warm, and the eager loss.

The fused loss kernels (anchor/fused_passes.py) compile on their first call. Each case is a fresh
``python -m anchored_megatron.train`` process (single rank, 3 steps) on the same model and data:
``cold`` with an empty ``TORCHINDUCTOR_CACHE_DIR``, ``warm`` on the cache ``cold`` left,
``eager`` with ``ANCHORED_FUSED_LOSS=0`` (the first step's other costs). The cases alternate over
the rounds, so machine load drifts hit all of them alike. Prints step 1 and the median of steps 2-3.

    .venv/bin/python bench/compile_bench.py [--rounds 2]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from step_bench import MODEL, make_setting  # noqa: E402 - the step bench's model and data


def _run_config(root: str) -> dict:
    data = make_setting(root)
    return {"model": dict(MODEL), "student": {"checkpoint": os.path.join(root, "base")},
            "reference": {"checkpoint": os.path.join(root, "teacher")},
            "data": {"paths": [data], "tokenizer": os.path.join(root, "tok"), "cache_dir": os.path.join(root, "cache")},
            "anchor": {"objective": "anchored", "alpha": 0.5, "outer_iterations": 1, "epochs_per_iteration": 1},
            "train": {"global_batch_size": 4, "max_steps": 3, "tensorboard": False, "progress_bar": False}}


def _first_steps(root: str, run: dict, case: str, cache: str) -> list[float]:
    out = os.path.join(root, f"out-{case}")
    shutil.rmtree(out, ignore_errors=True)
    config = os.path.join(root, "run.json")  # JSON is YAML
    with open(config, "w") as fh:
        json.dump(dict(run, output_dir=out), fh)
    env = dict(os.environ, PYTHONPATH=ROOT, TORCHINDUCTOR_CACHE_DIR=cache)
    if case == "eager":
        env["ANCHORED_FUSED_LOSS"] = "0"
    subprocess.run([sys.executable, "-m", "anchored_megatron.train", "--config", config], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        return [json.loads(line)["step_time_s"] for line in fh]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    root = tempfile.mkdtemp(prefix="compile-bench-")
    run = _run_config(root)
    times = {"cold": [], "warm": [], "eager": []}
    for round_index in range(args.rounds):
        cache = os.path.join(root, f"inductor-{round_index}")
        for case in times:  # cold fills the cache warm then reads
            times[case].append(_first_steps(root, run, case, cache))
    print(f"## First-step compile of the loss kernels — `bench/compile_bench.py` ({datetime.date.today()})\n")
    print(f"Model {MODEL}, 1 rank, anchored (snapshot, alpha 0.5), {args.rounds} rounds; seconds.\n")
    print("| case | step 1 (each round) | steps 2-3 (median) |")
    print("| --- | --- | --- |")
    for case, runs in times.items():
        first = ", ".join(f"{r[0]:.1f}" for r in runs)
        later = statistics.median(t for r in runs for t in r[1:])
        print(f"| {case} | {first} | {later:.2f} |")
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
