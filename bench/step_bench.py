"""Step time and peak memory of the anchored objectives against plain SFT, side by side, each
with the output layer fused into the loss (``model.fused_output_loss``, the default) and without.

Same model, data and layout (TP=2 on 2 gloo ranks, CPU) for every run; the runs are
interleaved over ``--rounds`` rounds so that machine load drifts hit all of them alike. Reports the
fastest step (first steps excluded; on a shared machine other jobs only ever add time) and the
peak RSS growth above the post-import baseline, as ratios to fused SFT and fused against unfused;
and for the anchored objectives, the time their frozen roles' forwards took inside that same step,
which splits the ratio to SFT into the frozen roles' share (a floor no loss-side work can lower)
and the rest. The snapshot objective also runs with ``train.frozen_hidden_cache`` over two epochs:
its step where both frozen roles are read from the cache, its first-epoch step that runs and
stores them, and from those the mean step of a T = K = 5 run.

    .venv/bin/python bench/step_bench.py [--steps 12] [--rounds 2] [--tp 2]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import resource
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODEL = dict(num_layers=4, hidden_size=256, ffn_hidden_size=768, num_attention_heads=8, num_query_groups=4, vocab_size=512, seq_length=256)
CACHED = "anchored snapshot, frozen cache"
WORDS = "alpha beta gamma delta epsilon red blue green one two three four five six seven eight nine ten plus minus equals".split()


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def make_checkpoints(base_dir, teacher_dir, model_dict):
    """A random base and a teacher = base with every weight nudged (a rank function)."""
    import torch

    from anchored_megatron.config import ModelConfig, ParallelConfig
    from anchored_megatron.checkpoint.weights import save_megatron_weights
    from anchored_megatron.models.builder import build_model_chunks
    from anchored_megatron.platform import initialize

    initialize(ParallelConfig(), seed=1)
    model = ModelConfig(**model_dict)
    chunks = build_model_chunks(model, ParallelConfig())
    save_megatron_weights(chunks, base_dir, model)
    with torch.no_grad():
        for p in chunks[0].parameters():
            p.add_(torch.randn_like(p) * 0.02)
    save_megatron_weights(chunks, teacher_dir, model)


class _TimedRole:
    """A frozen role that adds the wall time of each of its forwards to ``seconds[-1]``, the slot
    of the step in progress (``_run`` opens a new one after every step). ``module`` lets the
    trainer's ``unwrap`` reach the model inside."""

    def __init__(self, role, seconds: list):
        self.module = role
        self.seconds = seconds

    def __call__(self, *args, **kwargs):
        import time

        start = time.perf_counter()
        out = self.module(*args, **kwargs)
        self.seconds[-1] += time.perf_counter() - start
        return out


def _run(cfg_dict):
    """One trainer run; returns its peak RSS and, per step, the seconds its frozen roles' forwards
    took inside the step (the cost of the frozen roles, measured where it is paid)."""
    from anchored_megatron.config import RunConfig, build
    from anchored_megatron.training.trainer import Trainer

    baseline = _rss_mb()
    trainer = Trainer(build(RunConfig, cfg_dict))
    trainer.setup()
    frozen_s = [0.0]
    for stack in trainer.stacks:
        stack.frozen = [_TimedRole(role, frozen_s) for role in stack.frozen]
    train_step = trainer._train_step

    def timed_step(forward_step):
        record = train_step(forward_step)
        frozen_s.append(0.0)
        return record

    trainer._train_step = timed_step
    trainer.run()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"baseline_mb": baseline, "peak_mb": peak, "frozen_s": frozen_s[:-1]}


def write_tokenizer_and_data(root: str, records: int) -> tuple[str, str]:
    """A sentencepiece tokenizer (vocab 400) and ``records`` SFT records of random words under
    ``root``: (tokenizer dir, data file)."""
    from anchored_megatron.data.train_tokenizer import main as train_tokenizer

    rng = random.Random(0)
    corpus = os.path.join(root, "corpus.txt")
    with open(corpus, "w") as fh:
        fh.write("\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(2000)) + "\nUser: Assistant: System:\n")
    train_tokenizer(["--input", corpus, "--vocab-size", "400", "--output", os.path.join(root, "tok")])
    data = os.path.join(root, "sft.jsonl")
    with open(data, "w") as fh:
        for _ in range(records):
            record = {"prompt": " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 30))),
                      "response": " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 60)))}
            fh.write(json.dumps(record) + "\n")
    return os.path.join(root, "tok"), data


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tp", type=int, default=2)
    args = parser.parse_args(argv)

    from anchored_megatron.platform import run_on_ranks

    root = tempfile.mkdtemp(prefix="step-bench-")
    tokenizer, data = write_tokenizer_and_data(root, 600)
    run_on_ranks(make_checkpoints, 1, os.path.join(root, "base"), os.path.join(root, "teacher"), MODEL)

    objectives = {
        "sft": {"objective": "sft"},
        "anchored live": {"objective": "anchored", "source": "live"},
        "anchored snapshot": {"objective": "anchored", "source": "snapshot"},
    }
    variants = {(name, fused): anchor for name, anchor in objectives.items() for fused in (True, False)}
    # train.frozen_hidden_cache (fused only): two epochs, so that the second reads what the first stored.
    variants[(CACHED, True)] = {**objectives["anchored snapshot"], "epochs_per_iteration": 2}
    results = {key: {"step_s": [], "peak_mb": [], "growth_mb": [], "frozen_s": [], "store_step_s": []} for key in variants}
    for round_index in range(args.rounds):
        for (name, fused), anchor in variants.items():
            out = os.path.join(root, f"{name.replace(',', '').replace(' ', '_')}_{'fused' if fused else 'unfused'}_{round_index}")
            cfg = {
                "output_dir": out, "seed": 1, "model": {**MODEL, "fused_output_loss": fused}, "parallel": {"tp": args.tp},
                "student": {"checkpoint": os.path.join(root, "base")},
                "data": {"paths": [data], "tokenizer": tokenizer, "cache_dir": os.path.join(root, "cache")},
                "anchor": {"outer_iterations": 1, "epochs_per_iteration": 1, **anchor},
                "optim": {"lr": 1e-4}, "train": {"micro_batch_size": 2, "global_batch_size": 8, "max_steps": args.steps,
                                                  "save_at_iteration_end": False, "progress_bar": False, "tensorboard": False},
            }
            if name == CACHED:
                cfg["train"].update(frozen_hidden_cache=True, max_steps=None)
            if name != "sft":  # sft has no frozen role
                cfg["reference"] = {"checkpoint": os.path.join(root, "teacher")}
            memory = run_on_ranks(_run, args.tp, cfg, timeout=1800)
            with open(os.path.join(out, "metrics.jsonl")) as fh:
                records = [json.loads(line) for line in fh]
            # Steps 3.. of the run; with the cache, those of the second epoch whose frozen outputs all
            # came from the cache (and, apart, the first epoch's, which store them).
            steps = [i for i in range(2, len(records)) if records[i].get("frozen_cached", 0.0) == (1.0 if name == CACHED else 0.0)]
            fastest = min(steps, key=lambda i: records[i]["step_time_s"])
            results[(name, fused)]["step_s"].append(records[fastest]["step_time_s"])
            if name == CACHED:
                results[(name, fused)]["store_step_s"].append(
                    min(r["step_time_s"] for r in records[2:] if r["frozen_cached"] == 0.0))
            # The frozen forwards of that same step, on the slower rank (the step waits for it).
            results[(name, fused)]["frozen_s"].append(max(m["frozen_s"][fastest] for m in memory))
            results[(name, fused)]["peak_mb"].append(max(m["peak_mb"] for m in memory))
            results[(name, fused)]["growth_mb"].append(max(m["peak_mb"] - m["baseline_mb"] for m in memory))

    def median(key, field):
        return statistics.median(results[key][field])

    sft_time, sft_growth = median(("sft", True), "step_s"), median(("sft", True), "growth_mb")
    lines = [
        f"# step_bench {datetime.date.today().isoformat()}",
        f"model {MODEL['num_layers']} layers x hidden {MODEL['hidden_size']}, seq {MODEL['seq_length']}, vocab {MODEL['vocab_size']}, "
        f"global batch 8 (micro 2), TP={args.tp} on {args.tp} gloo ranks, {os.cpu_count()} CPU cores; "
        f"step time = fastest of steps 3..{args.steps} (other jobs only ever add time), median over {args.rounds} interleaved rounds; "
        f"load average {os.getloadavg()[0]:.1f} at the end",
        "",
        "| objective | output layer | step time (s) | vs fused sft | fused / unfused | peak RSS per rank (MB) | RSS growth above imports (MB) | vs fused sft |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for (name, fused) in variants:
        t, growth = median((name, fused), "step_s"), median((name, fused), "growth_mb")
        versus = f"{t / median((name, False), 'step_s'):.2f}x" if fused and (name, False) in results else ""
        lines.append(f"| {name} | {'fused' if fused else 'unfused'} | {t:.3f} | {t / sft_time:.2f}x | {versus} | "
                     f"{median((name, fused), 'peak_mb'):.0f} | {growth:.0f} | {growth / sft_growth:.2f}x |")
    lines += ["", "where an anchored step's time goes, against fused sft (the frozen roles' forwards timed inside that step):", ""]
    lines += ["| objective | output layer | frozen roles' forwards (s) | step minus them, vs fused sft | floor: sft + the frozen forwards |",
              "| --- | --- | --- | --- | --- |"]
    for (name, fused) in variants:
        if name == "sft":
            continue
        t, frozen = median((name, fused), "step_s"), median((name, fused), "frozen_s")
        lines.append(f"| {name} | {'fused' if fused else 'unfused'} | {frozen:.3f} | {(t - frozen) / sft_time:.2f}x | {1 + frozen / sft_time:.2f}x |")
    # What the cache saves over a whole run at the paper's T = K = 5 (25 epochs): the first epoch runs
    # and stores both frozen roles, the first epoch of each later iteration runs the refreshed snapshot
    # only (one role: half the uncached step's frozen forwards), every other epoch reads both.
    hit, store = median((CACHED, True), "step_s"), median((CACHED, True), "store_step_s")
    one_role = median(("anchored snapshot", True), "frozen_s") / 2
    amortized = (store + 4 * (hit + one_role) + 20 * hit) / 25
    lines += ["", f"anchored snapshot with train.frozen_hidden_cache (fused): a step that reads both frozen roles from the cache "
              f"{hit:.3f} s = {hit / sft_time:.2f}x sft; a first-epoch step that runs and stores them {store:.3f} s = "
              f"{store / median(('anchored snapshot', True), 'step_s'):.2f}x the uncached snapshot step; over a T = K = 5 run "
              f"(1 epoch storing both, 4 running the snapshot only, 20 reading both) {amortized:.3f} s per step = "
              f"{amortized / sft_time:.2f}x sft"]
    lines += ["", "targets (fused): anchored live <= 1.45x sft, anchored snapshot <= 1.70x sft; fused <= 1.05x unfused (step time)"]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
