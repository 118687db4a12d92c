"""Logits memory and step time of one anchored training step: output layer fused into the loss
(``model.fused_output_loss=true``) against the unfused path, side by side.

A vocabulary of 128256 at sequence length 4096 and TP=2 (2 gloo ranks), with a hidden size small
enough that the logits are the step's memory: one [4096, 64128] fp32 shard is 1 GiB, and the
unfused step holds the student's, the reference's and the snapshot's plus the loss gradient.
Runs are interleaved over rounds so that machine load drifts hit all of them alike. Reports per
run the peak RSS growth of one rank over steps 2..N (above its RSS after step 1: models,
optimizer state and data exist by then, and the first step compiles the loss kernels) and the
fastest of those steps (on a shared machine other jobs only ever add time), and the snapshot
step's time against SFT's with the same setting.

    .venv/bin/python bench/logits_memory_bench.py [--steps 4] [--rounds 2] [--seq 4096]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

VOCAB = 128256


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _run(cfg_dict):
    """Train; the peak RSS growth over steps 2..N above the RSS after step 1 (the first step
    compiles the loss kernels; Linux's peak counter is reset after it), before the final save."""
    from anchored_megatron.config import RunConfig, build
    from anchored_megatron.training.trainer import Trainer

    seen = {}

    class Measured(Trainer):
        def _train_step(self, forward_step):
            record = super()._train_step(forward_step)
            if "baseline" not in seen:
                with open("/proc/self/clear_refs", "w") as fh:
                    fh.write("5")  # reset VmHWM to the current RSS
                seen["baseline"] = _status_mb("VmRSS")
            return record

        def _save(self, progress):
            seen.setdefault("peak", _status_mb("VmHWM"))
            super()._save(progress)

    trainer = Measured(build(RunConfig, cfg_dict))
    trainer.setup()
    trainer.run()
    return {"growth_mb": seen["peak"] - seen["baseline"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=64)
    args = parser.parse_args(argv)

    from anchored_megatron.platform import run_on_ranks
    from bench.step_bench import make_checkpoints, write_tokenizer_and_data

    root = tempfile.mkdtemp(prefix="logits-memory-bench-")
    tokenizer, data = write_tokenizer_and_data(root, args.steps * args.seq // 40)  # enough packed sequences for every step
    model = dict(num_layers=2, hidden_size=args.hidden, ffn_hidden_size=2 * args.hidden, num_attention_heads=2, num_query_groups=2,
                 vocab_size=VOCAB, seq_length=args.seq)
    base, teacher = os.path.join(root, "base"), os.path.join(root, "teacher")
    run_on_ranks(make_checkpoints, 1, base, teacher, model)
    variants = {
        "snapshot, unfused": ({"objective": "anchored", "source": "snapshot"}, False),
        "snapshot, fused": ({"objective": "anchored", "source": "snapshot"}, True),
        "sft, fused": ({"objective": "sft"}, True),
    }
    results = {name: {"step_s": [], "growth_mb": []} for name in variants}
    for round_index in range(args.rounds):
        for name, (anchor, fused) in variants.items():
            out = os.path.join(root, f"{name.replace(', ', '_')}_{round_index}")
            cfg = {
                "output_dir": out, "seed": 1, "model": {"fused_output_loss": fused}, "parallel": {"tp": 2},
                "student": {"checkpoint": base},
                "data": {"paths": [data], "tokenizer": tokenizer, "cache_dir": os.path.join(root, "cache")},
                "anchor": {**anchor, "outer_iterations": 1, "epochs_per_iteration": 1},
                "optim": {"lr": 1e-4}, "train": {"micro_batch_size": 1, "global_batch_size": 1, "max_steps": args.steps,
                                                  "save_at_iteration_end": False, "progress_bar": False, "tensorboard": False},
            }
            if anchor["objective"] != "sft":
                cfg["reference"] = {"checkpoint": teacher}
            memory = run_on_ranks(_run, 2, cfg, timeout=3600)
            with open(os.path.join(out, "metrics.jsonl")) as fh:
                times = [json.loads(line)["step_time_s"] for line in fh][1:]
            results[name]["step_s"].append(min(times))
            results[name]["growth_mb"].append(max(m["growth_mb"] for m in memory))

    def median(name, key):
        return statistics.median(results[name][key])

    shard_mb = args.seq * (VOCAB // 2) * 4 / 2**20
    lines = [
        f"# logits_memory_bench {datetime.date.today().isoformat()}",
        f"model {model['num_layers']} layers x hidden {args.hidden}, vocab {VOCAB}, seq {args.seq}, micro batch 1, fp32, "
        f"TP=2 on 2 gloo ranks, {os.cpu_count()} CPU cores; one [seq, V/TP] fp32 logits shard = {shard_mb:.0f} MB; "
        f"steps 2..{args.steps} (step time: the fastest), median over {args.rounds} interleaved rounds; "
        f"load average {os.getloadavg()[0]:.1f} at the end",
        "",
        "| run | step time (s) | peak RSS growth per rank (MB) | in logits shards |",
        "| --- | --- | --- | --- |",
    ]
    for name in variants:
        growth = median(name, "growth_mb")
        lines.append(f"| {name} | {median(name, 'step_s'):.2f} | {growth:.0f} | {growth / shard_mb:.2f} |")
    memory_ratio = median("snapshot, fused", "growth_mb") / median("snapshot, unfused", "growth_mb")
    time_ratio = median("snapshot, fused", "step_s") / median("snapshot, unfused", "step_s")
    snapshot_vs_sft = median("snapshot, fused", "step_s") / median("sft, fused", "step_s")
    verdict = lambda ok: "MET" if ok else "MISSED"  # noqa: E731
    lines += [
        "",
        f"fused / unfused peak memory: {memory_ratio:.2f} (target <= 0.25) {verdict(memory_ratio <= 0.25)}",
        f"fused / unfused step time:   {time_ratio:.2f} (target <= 1.05) {verdict(time_ratio <= 1.05)}",
        f"snapshot / sft step time (fused): {snapshot_vs_sft:.2f} (target <= 1.70) {verdict(snapshot_vs_sft <= 1.70)}",
    ]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
