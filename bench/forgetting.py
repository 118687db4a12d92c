"""Forgetting benchmark: does Anchored Learning keep SFT's target gain while losing less of
what the base could do? Every job is a real trainer run at TP=2 on 2 gloo ranks.

Full version (the benchmark's plan): regime C with 3 seeds x 2 fine-tuning learning rates
(mean ± std), regimes A and B with one seed as controls, T x K = 5 x 5, 500 held-out items
per task. ``--reduced`` runs fewer seeds / learning rates / a smaller budget and says so in its
output; ``--seeds/--lrs/--controls`` run (or re-render from the cache) part of the plan. Jobs are cached under
``--output-dir``: an interrupted run resumes at the first unfinished job.

    python bench/forgetting.py [--reduced] [--output-dir runs/forgetting] [--results docs/results.md]
    python bench/forgetting.py --study [--large] [--output-dir runs/forgetting_study] [--groups C:0-4,A:0-2]

``--study``: every method and variant (``STUDY_METHODS``) at lr 3e-4 on regime C seeds 0-4 and
regime A seeds 0-2 (``--groups`` runs part of it), every saved checkpoint evaluated, and for the
trained methods each of their first 4 epochs too, by a re-run stopped there (checked step by step
against the full run: the matched-target levels are passed within those epochs); it writes
bench/results/forgetting_summary.json (Pareto frontiers, paired differences with 95% t-intervals)
and one Pareto plot per regime. Hours on 2 cores: run it in the background; it resumes job by job.
``--study --large``: the same on a model of about 8x the parameters (hidden 256, 4 layers),
regime C seeds 0-1, for SFT, SFT+KL, distillation, anchored, the two anchored variants closest to the
study's goal on the small model (the replay trust region, the SFT+KL teacher) and the replay variant's
control (SFT with the same replay data); its own
output directory and bench/results/forgetting_summary_large.json, with the small model's figures on the
same seeds and methods beside it (read from ``--small-output-dir``, the small study's cache; what is
missing there is trained).

Prints the tables; writes them (+ plots) to --results and the printed output to
bench/results/forgetting.txt.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from anchored_megatron.eval.report import markdown_tables, plot_tradeoff  # noqa: E402
from anchored_megatron.experiment.jobs import STUDY_METHODS, WISE_FT_PREFIX, ExperimentConfig  # noqa: E402
from anchored_megatron.experiment.runner import run_experiment  # noqa: E402

FULL = dict(  # REDUCED's model, data and base (so cached bases are reused), the plan's eval size and T x K
    sizes=dict(skills=("add", "rev", "up", "rep"), target_min_steps=1, target_max_steps=2, pretrain_per_skill=2000, finetune_examples=500, eval_per_skill=500,
               hidden_size=128, num_layers=2, ffn_hidden_size=384, base_epochs=12, base_lr=3e-3, base_global_batch=64,
               teacher_epochs=3, finetune_global_batch=16, outer_iterations=5, epochs_per_iteration=5, eval_every_epochs=5),
    regime_c_seeds=(0, 1, 2), learning_rates=(3e-4, 1e-3), control_regimes=("A", "B"), control_lr=3e-4,
)


def trained(methods) -> tuple[str, ...]:
    """The methods that train (not the WiSE-FT merges)."""
    return tuple(m for m in methods if not m.startswith(WISE_FT_PREFIX))


# Most methods pass 0.9x the teacher's target accuracy within their first epochs, before the first
# regular checkpoint (epoch 5), so the first 4 epochs of every trained method are also evaluated one
# by one (a prefix re-run each, checked step by step to be the same run): without those points a
# chord from the base to epoch 5 stood in for the path at matched target, lower for the fast methods.
TRAINED_STUDY_METHODS = trained(STUDY_METHODS)
STUDY = dict(  # FULL's model, data, base and budget; every method; the seeds the statistics need
    sizes=dict(FULL["sizes"], methods=STUDY_METHODS, early_eval_epochs=4, early_eval_methods=TRAINED_STUDY_METHODS), groups=(("C", tuple(range(5))), ("A", tuple(range(3)))), lr=3e-4,
)
# The size check: a 4x wider, 2x deeper model (about 8x the parameters) on regime C with 2 seeds,
# for the methods whose anchored / SFT ratio it is meant to show; "--study --large".
LARGE_METHODS = ("sft", "sft_kl", "distill", "anchored", "anchored_ref_sftkl", "anchored_replay", "sft_replay")
STUDY_LARGE = dict(
    sizes=dict(FULL["sizes"], hidden_size=256, num_layers=4, ffn_hidden_size=768,
               methods=LARGE_METHODS, early_eval_epochs=4, early_eval_methods=LARGE_METHODS),
    groups=(("C", (0, 1)),), lr=3e-4,
)
REDUCED = dict(  # the demo's model and base budget (measured to learn the skills), regime C, 2 seeds, one lr
    sizes=dict(skills=("add", "rev", "up", "rep"), target_min_steps=1, target_max_steps=2, pretrain_per_skill=2000, finetune_examples=500, eval_per_skill=100,
               hidden_size=128, num_layers=2, ffn_hidden_size=384, base_epochs=12, base_lr=3e-3, base_global_batch=64,
               teacher_epochs=3, finetune_global_batch=16, outer_iterations=3, epochs_per_iteration=2, eval_every_epochs=2),
    regime_c_seeds=(0, 1), learning_rates=(3e-4,), control_regimes=(), control_lr=3e-4,
)


def settings_text(plan: dict, reduced: bool) -> str:
    s = plan["sizes"]
    complete = all(plan[k] == FULL[k] for k in ("regime_c_seeds", "learning_rates", "control_regimes"))
    kind = "REDUCED run (not the full benchmark)" if reduced else "Full run" if complete else "PART of the full plan (overridden on the command line)"
    return (
        f"{kind}: regime C seeds {list(plan['regime_c_seeds'])}, "
        f"fine-tuning lr {list(plan['learning_rates'])}; controls {list(plan['control_regimes']) or 'none'}. "
        f"Skills: {', '.join(s.get('skills', ('add', 'rev', 'up', 'rep', 'kv')))}. Model: Llama-shaped, hidden {s['hidden_size']}, {s['num_layers']} layers, ffn {s['ffn_hidden_size']}, char vocabulary, TP=2. "
        f"Target: {s.get('target_min_steps', 2)}-{s.get('target_max_steps', 3)} derived quantities. Base: {s['pretrain_per_skill']} examples per skill, {s['base_epochs']} epochs, lr {s['base_lr']:g} cosine. "
        f"Fine-tuning: {s['finetune_examples']} target examples, global batch {s['finetune_global_batch']}, constant lr, "
        f"budget T x K = {s['outer_iterations']} x {s['epochs_per_iteration']} epochs for every method; teacher {s['teacher_epochs']} epochs. "
        f"Eval: {s['eval_per_skill']} held-out items per task, greedy, checkpoints every {s['eval_every_epochs']} epochs."
    )


def run(plan: dict, output_dir: str, reduced: bool, results_path: str) -> str:
    started = time.perf_counter()
    sections = [f"Settings: {settings_text(plan, reduced)}", ""]
    plot_dir = os.path.join(os.path.dirname(results_path) or ".", "results")
    os.makedirs(plot_dir, exist_ok=True)
    groups = [("C", lr, plan["regime_c_seeds"]) for lr in plan["learning_rates"]]
    groups += [(regime, plan["control_lr"], (0,)) for regime in plan["control_regimes"]]
    for regime, lr, seeds in groups:
        runs = []
        for seed in seeds:
            cfg = ExperimentConfig(output_dir=os.path.join(output_dir, f"{regime}_seed{seed}"), seed=seed, regime=regime,
                                   finetune_lr=lr, tag=f"_lr{lr:g}", **plan["sizes"])
            t0 = time.perf_counter()
            runs.append(run_experiment(cfg, max_new_tokens=56))
            print(f"regime {regime} seed {seed} lr {lr:g}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        title = f"regime {regime}, lr {lr:g}, {len(seeds)} seed(s)"
        sections.append(markdown_tables(runs, title))
        plot = plot_tradeoff(runs, os.path.join(plot_dir, f"forgetting_{'' if reduced else 'full_'}{regime}_lr{lr:g}.png"), title)
        sections.append(f"![{title}]({os.path.relpath(plot, os.path.dirname(results_path) or '.')})\n")
    sections.append(f"Wall time: {time.perf_counter() - started:.0f} s (jobs reused from the cache count ~0).")
    return "\n".join(sections)


def parse_groups(text: str) -> tuple:
    """"C:0-4,A:0-2" -> (("C", (0, 1, 2, 3, 4)), ("A", (0, 1, 2)))."""
    groups = []
    for part in filter(None, text.split(",")):
        regime, _, seeds = part.partition(":")
        first, _, last = seeds.partition("-")
        if regime not in ("A", "B", "C") or not first.isdigit() or not (last or first).isdigit():
            raise SystemExit(f"--groups: expected REGIME:FIRST-LAST items like C:0-4, got {part!r}")
        groups.append((regime, tuple(range(int(first), int(last or first) + 1))))
    return tuple(groups)


def run_study(plan: dict, output_dir: str) -> dict:
    """Train and evaluate every (regime, seed) of the study plan (cached job by job); returns
    {regime: [results per seed]}."""
    by_regime = {}
    for regime, seeds in plan["groups"]:
        for seed in seeds:
            cfg = ExperimentConfig(output_dir=os.path.join(output_dir, f"{regime}_seed{seed}"), seed=seed, regime=regime,
                                   finetune_lr=plan["lr"], tag=f"_lr{plan['lr']:g}", progress_bar=False, **plan["sizes"])
            t0 = time.perf_counter()
            by_regime.setdefault(regime, []).append(run_experiment(cfg, max_new_tokens=56, timeout=12 * 3600.0))
            print(f"regime {regime} seed {seed}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return by_regime


def cell(interval: dict | None) -> str:
    """A mean_interval as "+m [lo, hi] (n=k)", "+m (n=1)" or "—"."""
    if interval is None or interval["mean"] is None:
        return "—"
    if interval["ci_low"] is None:
        return f"{interval['mean']:+.3f} (n=1)"
    return f"{interval['mean']:+.3f} [{interval['ci_low']:+.3f}, {interval['ci_high']:+.3f}] (n={interval['n']})"


def paired_table(records: list[dict]) -> str:
    """General accuracy at 0.9x the teacher's target accuracy and the paired differences."""
    lines = ["| method | seeds reaching 0.9x | general at 0.9x | − SFT [95% CI] | − SFT+KL [95% CI] | − distill [95% CI] | − SFT+replay [95% CI] "
             "| degradation at 90% of SFT's gain |", "| --- " * 8 + "|"]

    for r in records:
        diffs = r.get("paired_diff_at_0.9x", {})
        general = "—" if r["general_at_0.9x"] is None else f"{r['general_at_0.9x']:.3f}"
        degradation = "—" if r["degradation_at_0.9_sft_gain"] is None else f"{100 * r['degradation_at_0.9_sft_gain']:.1f}% ({r['reached_0.9_sft_gain']}/{len(r['seeds'])})"
        lines.append(f"| {r['method']} | {r['reached_0.9x']}/{len(r['seeds'])} | {general} | {cell(diffs.get('sft'))} | "
                     f"{cell(diffs.get('sft_kl'))} | {cell(diffs.get('distill'))} | {cell(diffs.get('sft_replay'))} | {degradation} |")
    return "\n".join(lines) + "\n"


def tracking_table(tracking: dict) -> str:
    """Each teacher-trained method's final accuracies minus its own teacher's, paired per seed."""
    lines = ["| method | its teacher | general − teacher's [95% CI] | target − teacher's [95% CI] |", "| --- " * 4 + "|"]
    lines += [f"| {r['method']} | {r['teacher']} | {cell(r['general_minus_teacher'])} | {cell(r['target_minus_teacher'])} |"
              for r in tracking["methods"]]
    pooled = tracking["anchored_general_vs_teacher_general"]
    r = "—" if pooled["r"] is None else f"{pooled['r']:.2f}"
    lines += ["", f"Anchored students' final general accuracy against their own teacher's, pooled over seeds and the anchored "
              f"methods whose loss has no term toward the base or general data: Pearson r = {r} over {pooled['n']} (teacher, student) pairs."]
    return "\n".join(lines) + "\n"


def early_eval_who(sizes: dict) -> str:
    every = set(sizes["early_eval_methods"]) == set(trained(sizes["methods"]))
    return "every trained method" if every else ", ".join(sizes["early_eval_methods"])


def size_comparison(by_size: dict) -> list[dict]:
    """{size: (runs, records)} of the same seeds -> per size and method: the base's general
    accuracy, final gain and degradation, degradation as a fraction of SFT's, general accuracy at
    0.9x the teacher's target and its paired difference from SFT."""
    from anchored_megatron.eval.report import general_accuracy

    rows = []
    for size, (runs, records) in by_size.items():
        base_general = sum(general_accuracy(r["base"]["points"][-1]) for r in runs) / len(runs)
        sft = next(r for r in records if r["method"] == "sft")
        for r in records:
            if r["method"] in LARGE_METHODS:
                rows.append({"method": r["method"], "size": size, "seeds": r["seeds"], "base_general": base_general,
                             "gain": r["gain"], "degradation": r["degradation"],
                             "degradation_over_sft": r["degradation"] / sft["degradation"] if sft["degradation"] else None,
                             "general_at_0.9x": r["general_at_0.9x"],
                             "minus_sft_at_0.9x": r.get("paired_diff_at_0.9x", {}).get("sft")})
    return rows


def size_table(rows: list[dict]) -> str:
    lines = ["| method | model | base general | final gain | final degradation | degradation / SFT's | general at 0.9x | − SFT at 0.9x [95% CI] |",
             "| --- " * 8 + "|"]
    for method in LARGE_METHODS:
        for r in (r for r in rows if r["method"] == method):
            ratio = "—" if r["degradation_over_sft"] is None else f"{r['degradation_over_sft']:.2f}"
            general = "—" if r["general_at_0.9x"] is None else f"{r['general_at_0.9x']:.3f}"
            lines.append(f"| {method} | {r['size']} | {r['base_general']:.3f} | {r['gain']:.3f} | {100 * r['degradation']:.1f}% | {ratio} | "
                         f"{general} | {cell(r['minus_sft_at_0.9x'])} |")
    return "\n".join(lines) + "\n"


def render_study(plan: dict, by_regime: dict, results_path: str, suffix: str = "", small_by_regime: dict | None = None) -> str:
    """Tables, the paired-difference table, one Pareto plot per regime, and
    bench/results/forgetting_summary.json; returns the text. With ``small_by_regime`` (the small
    model's runs on the same seeds and methods) also the two sizes side by side."""
    from anchored_megatron.eval.study import plot_frontiers, summarize_regime, teacher_tracking

    plot_dir = os.path.join(os.path.dirname(results_path) or ".", "results")
    os.makedirs(plot_dir, exist_ok=True)
    seeds = dict(plan["groups"])
    s = plan["sizes"]
    sections = [
        f"Settings: the method study. Regimes and seeds: {'; '.join(f'{r} {list(v)}' for r, v in seeds.items())}; fine-tuning lr {plan['lr']:g}. "
        f"Model: Llama-shaped, hidden {s['hidden_size']}, {s['num_layers']} layers, ffn {s['ffn_hidden_size']}, char vocabulary, TP=2. "
        f"Base: {s['pretrain_per_skill']} examples per skill, {s['base_epochs']} epochs. Fine-tuning: {s['finetune_examples']} target "
        f"examples, global batch {s['finetune_global_batch']}, constant lr, T x K = {s['outer_iterations']} x {s['epochs_per_iteration']} "
        f"epochs for every method; teacher {s['teacher_epochs']} epochs. Eval: {s['eval_per_skill']} held-out items per task, greedy, "
        f"every {s['eval_every_epochs']} epochs" + (f", and each of the first {s['early_eval_epochs']} for {early_eval_who(s)}"
                                                    if s.get("early_eval_epochs") else "") + f". Methods: {', '.join(s['methods'])}.", ""]
    summary, tracking, size_rows = [], {}, {}
    for regime, runs in by_regime.items():
        records = summarize_regime(runs, regime, list(seeds[regime]))
        summary += records
        tracking[regime] = teacher_tracking(runs)
        title = f"regime {regime}, lr {plan['lr']:g}, {len(runs)} seed(s)"
        plot = plot_frontiers(runs, os.path.join(plot_dir, f"forgetting_study{suffix}_{regime}.png"), f"Pareto frontiers, {title}")
        sections += [markdown_tables(runs, title), "General accuracy at 0.9x the teacher's target accuracy, paired across seeds "
                     "(method − other, same base and teacher per seed; 95% Student t-interval):", "", paired_table(records),
                     "Where each student ends against its own teacher (final checkpoints, paired per seed):", "",
                     tracking_table(tracking[regime]),
                     f"![Pareto frontiers, {title}]({os.path.relpath(plot, os.path.dirname(results_path) or '.')})", ""]
        if small_by_regime is not None:
            small = small_by_regime[regime]
            rows = size_comparison({"small": (small, summarize_regime(small, regime, list(seeds[regime]))), "large": (runs, records)})
            size_rows[regime] = rows
            sections += [f"The small model (hidden {STUDY['sizes']['hidden_size']} x {STUDY['sizes']['num_layers']}) and this one on the same "
                         f"seeds {list(seeds[regime])}, regime {regime} (degradation: mean over seeds of the final checkpoint's relative loss "
                         "of general accuracy; its ratio to SFT's is a ratio of those means):", "", size_table(rows)]
    os.makedirs(os.path.join("bench", "results"), exist_ok=True)
    with open(os.path.join("bench", "results", f"forgetting_summary{suffix}.json"), "w", encoding="utf-8") as fh:
        json.dump({"date": datetime.date.today().isoformat(), "lr": plan["lr"], "groups": {k: list(v) for k, v in seeds.items()},
                   "records": summary, "teacher_tracking": tracking, **({"size_comparison": size_rows} if size_rows else {})}, fh, indent=1)
        fh.write("\n")
    return "\n".join(sections)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reduced", action="store_true")
    parser.add_argument("--study", action="store_true", help="the method study (every method and variant, C seeds 0-4, A seeds 0-2)")
    parser.add_argument("--groups", help="with --study: REGIME:FIRST-LAST seeds, comma-separated (default C:0-4,A:0-2)")
    parser.add_argument("--large", action="store_true", help="with --study: the larger model's plan")
    parser.add_argument("--output-dir", default=os.path.join("runs", "forgetting"))
    parser.add_argument("--small-output-dir", default=os.path.join("runs", "forgetting_study"),
                        help="with --study --large: the small study's output directory, for the same seeds side by side")
    parser.add_argument("--results", default=os.path.join("docs", "results_forgetting_tables.md"),
                        help="markdown file for the tables (docs/results.md holds the analysis and links here)")
    parser.add_argument("--seeds", help="override the regime-C seeds, e.g. 0,1,2 (a subset of the plan; said in the output)")
    parser.add_argument("--lrs", help="override the fine-tuning learning rates, e.g. 3e-4,1e-3")
    parser.add_argument("--controls", help="override the control regimes, e.g. A,B (empty: none)")
    args = parser.parse_args(argv)
    if args.study:
        plan = dict(STUDY_LARGE if args.large else STUDY)
        if args.groups:
            plan["groups"] = parse_groups(args.groups)
        suffix = "_large" if args.large else ""
        default_dir = os.path.join("runs", "forgetting_study" + suffix)
        output_dir = args.output_dir if args.output_dir != parser.get_default("output_dir") else default_dir
        by_regime = run_study(plan, output_dir)
        small_by_regime = None
        if args.large:  # the small model on the same seeds and methods: cached by the full study, else trained here
            picked = {k: plan["sizes"][k] for k in ("methods", "early_eval_methods")}
            small_plan = dict(STUDY, groups=plan["groups"], sizes=dict(STUDY["sizes"], **picked))
            small_by_regime = run_study(small_plan, args.small_output_dir)
        results = args.results if args.results != parser.get_default("results") else os.path.join("docs", f"results_forgetting_study{suffix}_tables.md")
        text = render_study(plan, by_regime, results, suffix, small_by_regime)
        stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
        print(text)
        with open(results, "w", encoding="utf-8") as fh:
            fh.write(f"# Forgetting study tables ({stamp})\n\nWritten by bench/forgetting.py --study.\n\n{text}\n")
        with open(os.path.join("bench", "results", f"forgetting_study{suffix}.txt"), "w", encoding="utf-8") as fh:
            fh.write(f"{stamp}\n{text}\n")
        return 0
    plan = dict(REDUCED if args.reduced else FULL)
    if args.seeds is not None:
        plan["regime_c_seeds"] = tuple(int(x) for x in args.seeds.split(",") if x)
    if args.lrs is not None:
        plan["learning_rates"] = tuple(float(x) for x in args.lrs.split(",") if x)
    if args.controls is not None:
        plan["control_regimes"] = tuple(x for x in args.controls.split(",") if x)
    text = run(plan, args.output_dir, args.reduced, args.results)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    print(text)
    with open(args.results, "w", encoding="utf-8") as fh:
        fh.write(f"# Forgetting benchmark tables ({stamp})\n\nWritten by bench/forgetting.py{' --reduced' if args.reduced else ''}.\n\n{text}\n")
    os.makedirs(os.path.join("bench", "results"), exist_ok=True)
    with open(os.path.join("bench", "results", "forgetting.txt"), "w", encoding="utf-8") as fh:
        fh.write(f"{stamp}\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
