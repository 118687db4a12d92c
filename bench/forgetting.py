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
from anchored_megatron.eval.study_tables import render_study  # noqa: E402
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


def early_eval_who(sizes: dict) -> str:
    every = set(sizes["early_eval_methods"]) == set(trained(sizes["methods"]))
    return "every trained method" if every else ", ".join(sizes["early_eval_methods"])


def study_settings_text(plan: dict) -> str:
    s = plan["sizes"]
    seeds = dict(plan["groups"])
    return (
        f"Settings: the method study. Regimes and seeds: {'; '.join(f'{r} {list(v)}' for r, v in seeds.items())}; fine-tuning lr {plan['lr']:g}. "
        f"Model: Llama-shaped, hidden {s['hidden_size']}, {s['num_layers']} layers, ffn {s['ffn_hidden_size']}, char vocabulary, TP=2. "
        f"Base: {s['pretrain_per_skill']} examples per skill, {s['base_epochs']} epochs. Fine-tuning: {s['finetune_examples']} target "
        f"examples, global batch {s['finetune_global_batch']}, constant lr, T x K = {s['outer_iterations']} x {s['epochs_per_iteration']} "
        f"epochs for every method; teacher {s['teacher_epochs']} epochs. Eval: {s['eval_per_skill']} held-out items per task, greedy, "
        f"every {s['eval_every_epochs']} epochs" + (f", and each of the first {s['early_eval_epochs']} for {early_eval_who(s)}"
                                                    if s.get("early_eval_epochs") else "") + f". Methods: {', '.join(s['methods'])}."
    )


def write_study(plan: dict, by_regime: dict, results: str, suffix: str, small_by_regime: dict | None = None) -> str:
    """Render the study (eval.study_tables) into ``results`` and bench/results/forgetting_study{suffix}.txt,
    its summary into bench/results/forgetting_summary{suffix}.json; returns the text. With
    ``small_by_regime``, the small model (STUDY's sizes) on the same seeds beside it."""
    small_model = f"hidden {STUDY['sizes']['hidden_size']} x {STUDY['sizes']['num_layers']}"
    text, summary = render_study(by_regime, dict(plan["groups"]), plan["lr"], results, study_settings_text(plan), plot_suffix=suffix,
                                 small_by_regime=small_by_regime, small_model=small_model, size_methods=plan["sizes"]["methods"])
    os.makedirs(os.path.join("bench", "results"), exist_ok=True)
    with open(os.path.join("bench", "results", f"forgetting_summary{suffix}.json"), "w", encoding="utf-8") as fh:
        json.dump({"date": datetime.date.today().isoformat(), **summary}, fh, indent=1)
        fh.write("\n")
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    with open(results, "w", encoding="utf-8") as fh:
        fh.write(f"# Forgetting study tables ({stamp})\n\nWritten by bench/forgetting.py --study.\n\n{text}\n")
    with open(os.path.join("bench", "results", f"forgetting_study{suffix}.txt"), "w", encoding="utf-8") as fh:
        fh.write(f"{stamp}\n{text}\n")
    return text


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
        print(write_study(plan, by_regime, results, suffix, small_by_regime))
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
