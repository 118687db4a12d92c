"""`make demo`: the forgetting experiment, small, end to end on CPU with TP=2 (two gloo ranks).

Pretrains a tiny Llama-shaped base on general skills (paper-like regime A), makes the
teacher (short SFT on an iGSM-style target), runs SFT, SFT+KL, distillation and Anchored
Learning from the base, evaluates every checkpoint with greedy generation through Megatron,
and prints the gain / degradation table; writes output_dir/results.md and tradeoff.png.
Jobs are cached in the output directory: a second run reuses them.

    python -m anchored_megatron.demo [--output-dir DIR] [--tiny]

The demo is far too small for its numbers to settle anything: see bench/forgetting.py and
docs/results.md for the measured benchmark.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from anchored_megatron.experiment.jobs import METHODS, ExperimentConfig

# The demo's sizes, chosen by measurement (bench/demo_sizing.py, docs/results.md): regime A
# (plain answers, the base partly knows the target's answer), four skills (key-value recall
# needs thousands more steps), hidden 128 x 2 layers, 312 base steps of 64 packed sequences
# at lr 3e-3, a 1-2 step target; with these the base reaches general accuracy 0.73.
DEMO = dict(
    regime="A", skills=("add", "rev", "up", "rep"), target_min_steps=1, target_max_steps=2, pretrain_per_skill=2000, finetune_examples=500, eval_per_skill=80,
    hidden_size=128, num_layers=2, ffn_hidden_size=384, base_epochs=12, base_lr=3e-3, base_global_batch=64,
    teacher_epochs=3, finetune_lr=3e-4, finetune_global_batch=16, outer_iterations=3, epochs_per_iteration=2,
    methods=("sft", "sft_kl", "distill", "anchored"), eval_every_epochs=2,
)
# A minimal size for tests (well under a minute of training): same pipeline, meaningless numbers.
TINY = dict(DEMO, pretrain_per_skill=40, finetune_examples=48, eval_per_skill=4, base_epochs=1, teacher_epochs=1,
            outer_iterations=2, epochs_per_iteration=1, eval_every_epochs=1, skills=("add", "rev", "up", "rep"),
            hidden_size=32, ffn_hidden_size=64, base_global_batch=16)


def run_demo(output_dir: str, sizes: dict, *, max_new_tokens: int = 32, progress_bar: bool = True) -> dict:
    """Run (or reuse) every job, write results.md + tradeoff.png; returns their paths and the table."""
    from anchored_megatron.eval.report import markdown_tables, plot_tradeoff
    from anchored_megatron.experiment.runner import run_experiment

    cfg = ExperimentConfig(output_dir=output_dir, progress_bar=progress_bar, **sizes)
    started = time.perf_counter()
    results = run_experiment(cfg, max_new_tokens=max_new_tokens)
    title = f"demo, regime {cfg.regime}, seed {cfg.seed}, lr {cfg.finetune_lr:g}, budget {cfg.budget_epochs} epochs"
    table = markdown_tables([results], title)
    plot = plot_tradeoff([results], os.path.join(output_dir, "tradeoff.png"), title)
    seconds = time.perf_counter() - started
    timing = "\n".join(
        f"- {name}: train {r['train'].get('train_seconds', 0):.0f} s, eval {r.get('eval_seconds', 0):.0f} s" for name, r in results.items()
    )
    report = os.path.join(output_dir, "results.md")
    with open(report, "w", encoding="utf-8") as fh:
        fh.write(f"# Forgetting demo\n\n{table}\n![trade-off]({os.path.basename(plot)})\n\nTime per job (a job reused from the cache shows the time of the run that made it):\n{timing}\n\n"
                 f"Total {seconds:.0f} s. A demo-sized run: single seed, {cfg.eval_per_skill} items per task "
                 f"(binomial SE up to ±{50 / cfg.eval_per_skill ** 0.5:.0f} points); it demonstrates the pipeline, not the claim.\n")
    return {"results": results, "table": table, "report": report, "plot": plot, "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    from anchored_megatron.platform import compile_cache, warnings_filter

    warnings_filter.install()
    compile_cache.use_persistent_cache()  # the ranks it starts inherit it
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default=os.path.join("runs", "demo"))
    parser.add_argument("--tiny", action="store_true", help="minimal sizes (a smoke test, meaningless numbers)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, help=f"methods to fine-tune (default: {' '.join(DEMO['methods'])})")
    args = parser.parse_args(argv)
    sizes = TINY if args.tiny else DEMO
    out = run_demo(args.output_dir, dict(sizes, methods=tuple(args.methods)) if args.methods else sizes)
    print()
    print(out["table"])
    print(f"wrote {out['report']} and {out['plot']} in {out['seconds']:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
