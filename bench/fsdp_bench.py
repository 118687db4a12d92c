"""Peak memory and step time of an anchored run (student + reference + snapshot) with the roles
replicated over data-parallel ranks (Megatron DDP + distributed optimizer) against Megatron-FSDP
(``parallel.fsdp=true``), side by side.

8 layers x hidden 512 at DP=2 (2 gloo ranks), fp32, so that the three roles' weights, the
student's grads and Adam state dominate what a rank holds. Runs are interleaved over rounds so
that machine load drifts hit both alike. Reports per run the peak RSS of one rank (the larger of
the two) up to the last step and its growth above the RSS just before the roles are built; the
live RSS after a step above that same base (freed heap pages returned first with malloc_trim,
which the peak cannot show: the process heap keeps them); the frozen roles' parameter storage
after a step (measured on the tensors); and the fastest step after the first (on a shared
machine other jobs only ever add time).

    .venv/bin/python bench/fsdp_bench.py [--steps 4] [--rounds 2] [--layers 8] [--hidden 512]
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

from bench.logits_memory_bench import _status_mb  # noqa: E402 - after the path set-up above


def _run(cfg_dict):
    """Train; this rank's RSS before the roles are built, its peak before the final save, the
    largest live RSS after a step above the first, and the frozen roles' parameter bytes."""
    import ctypes

    from anchored_megatron.config import RunConfig, build
    from anchored_megatron.models.layout import unwrap
    from anchored_megatron.training import sharding
    from anchored_megatron.training.trainer import Trainer

    seen = {}

    class Measured(Trainer):
        def _build_roles(self):
            seen["before_mb"] = _status_mb("VmRSS")
            super()._build_roles()

        def _train_step(self, forward_step):
            record = super()._train_step(forward_step)
            # What is live: freed pages go back to the system first (the heap keeps them otherwise).
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            seen["live_mb"] = max(seen.get("live_mb", 0.0), _status_mb("VmRSS") - seen["before_mb"])
            if "frozen_mb" not in seen:
                roles = [*self.reference, *self.snapshot]
                if self.cfg.parallel.fsdp:
                    frozen = sum(sharding.resident_parameter_bytes([role]) for role in roles)
                else:
                    frozen = sum(p.numel() * p.element_size() for role in roles for p in unwrap(role).parameters())
                seen["frozen_mb"] = frozen / 2**20
            return record

        def _save(self, progress):
            seen.setdefault("peak_mb", _status_mb("VmHWM"))
            return super()._save(progress)

    trainer = Measured(build(RunConfig, cfg_dict))
    trainer.setup()
    trainer.run()
    return seen


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--seq", type=int, default=256)
    args = parser.parse_args(argv)

    from anchored_megatron.platform import run_on_ranks
    from bench.step_bench import make_checkpoints, write_tokenizer_and_data

    root = tempfile.mkdtemp(prefix="fsdp-bench-")
    tokenizer, data = write_tokenizer_and_data(root, 4 * args.steps * args.seq // 40)
    model = dict(num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=4 * args.hidden, num_attention_heads=8,
                 num_query_groups=4, vocab_size=400, seq_length=args.seq)
    base, teacher = os.path.join(root, "base"), os.path.join(root, "teacher")
    run_on_ranks(make_checkpoints, 1, base, teacher, model)
    variants = {"DDP (roles replicated)": False, "Megatron-FSDP": True}
    results = {name: {"step_s": [], "peak_mb": [], "growth_mb": [], "live_mb": [], "frozen_mb": []} for name in variants}
    for round_index in range(args.rounds):
        for name, fsdp in variants.items():
            out = os.path.join(root, f"{'fsdp' if fsdp else 'ddp'}_{round_index}")
            cfg = {
                "output_dir": out, "seed": 1, "model": {"fused_output_loss": False}, "parallel": {"fsdp": fsdp},
                "student": {"checkpoint": base}, "reference": {"checkpoint": teacher},
                "data": {"paths": [data], "tokenizer": tokenizer, "cache_dir": os.path.join(root, "cache")},
                "anchor": {"objective": "anchored", "source": "snapshot", "outer_iterations": 1, "epochs_per_iteration": 1},
                "optim": {"lr": 1e-4}, "train": {"micro_batch_size": 1, "global_batch_size": 2, "max_steps": args.steps,
                                                  "save_at_iteration_end": False, "progress_bar": False, "tensorboard": False},
            }
            ranks = run_on_ranks(_run, 2, cfg, timeout=3600)
            with open(os.path.join(out, "metrics.jsonl")) as fh:
                times = [json.loads(line)["step_time_s"] for line in fh][1:]
            results[name]["step_s"].append(min(times))
            results[name]["peak_mb"].append(max(r["peak_mb"] for r in ranks))
            results[name]["growth_mb"].append(max(r["peak_mb"] - r["before_mb"] for r in ranks))
            results[name]["live_mb"].append(max(r["live_mb"] for r in ranks))
            results[name]["frozen_mb"].append(max(r["frozen_mb"] for r in ranks))

    def median(name, key):
        return statistics.median(results[name][key])

    ddp, fsdp = variants
    lines = [
        f"# fsdp_bench {datetime.date.today().isoformat()}",
        f"model {args.layers} layers x hidden {args.hidden} (ffn {4 * args.hidden}), seq {args.seq}, micro batch 1, fp32, "
        f"anchored (student + reference + snapshot), DP=2 on 2 gloo ranks, {os.cpu_count()} CPU cores; "
        f"steps 2..{args.steps} (step time: the fastest), median over {args.rounds} interleaved rounds; "
        f"load average {os.getloadavg()[0]:.1f} at the end",
        "",
        "| run | step time (s) | peak RSS per rank (MB) | peak growth from building the roles on (MB) "
        "| live after a step, same base (MB) | frozen roles' parameters per rank (MB) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name in variants:
        lines.append(f"| {name} | {median(name, 'step_s'):.2f} | {median(name, 'peak_mb'):.0f} | {median(name, 'growth_mb'):.0f} "
                     f"| {median(name, 'live_mb'):.0f} | {median(name, 'frozen_mb'):.1f} |")
    lines += [
        "",
        f"FSDP / DDP: step time {median(fsdp, 'step_s') / median(ddp, 'step_s'):.2f}, peak RSS {median(fsdp, 'peak_mb') / median(ddp, 'peak_mb'):.2f}, "
        f"peak growth {median(fsdp, 'growth_mb') / median(ddp, 'growth_mb'):.2f}, live {median(fsdp, 'live_mb') / median(ddp, 'live_mb'):.2f}, "
        f"frozen roles' parameters {median(fsdp, 'frozen_mb') / median(ddp, 'frozen_mb'):.2f}",
    ]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
