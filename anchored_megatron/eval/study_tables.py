"""The forgetting study's report: per regime the gain / degradation tables (``report``), the
paired differences at matched target accuracy and the teacher tracking (``study``) as markdown,
a Pareto plot, and optionally a smaller model's figures on the same seeds beside these.
bench/forgetting.py --study runs the jobs and writes what this renders.
"""

from __future__ import annotations

import os

from anchored_megatron.eval.report import general_accuracy, markdown_tables
from anchored_megatron.eval.study import plot_frontiers, summarize_regime, teacher_tracking


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


def size_comparison(by_size: dict, methods: tuple[str, ...]) -> list[dict]:
    """{size: (runs, records)} of the same seeds -> per size and each of ``methods``: the base's
    general accuracy, final gain and degradation, degradation as a fraction of SFT's, general
    accuracy at 0.9x the teacher's target and its paired difference from SFT."""
    rows = []
    for size, (runs, records) in by_size.items():
        base_general = sum(general_accuracy(r["base"]["points"][-1]) for r in runs) / len(runs)
        sft = next(r for r in records if r["method"] == "sft")
        for r in records:
            if r["method"] in methods:
                rows.append({"method": r["method"], "size": size, "seeds": r["seeds"], "base_general": base_general,
                             "gain": r["gain"], "degradation": r["degradation"],
                             "degradation_over_sft": r["degradation"] / sft["degradation"] if sft["degradation"] else None,
                             "general_at_0.9x": r["general_at_0.9x"],
                             "minus_sft_at_0.9x": r.get("paired_diff_at_0.9x", {}).get("sft")})
    return rows


def size_table(rows: list[dict], methods: tuple[str, ...]) -> str:
    """size_comparison's rows, method by method in the order of ``methods``."""
    lines = ["| method | model | base general | final gain | final degradation | degradation / SFT's | general at 0.9x | − SFT at 0.9x [95% CI] |",
             "| --- " * 8 + "|"]
    for method in methods:
        for r in (r for r in rows if r["method"] == method):
            ratio = "—" if r["degradation_over_sft"] is None else f"{r['degradation_over_sft']:.2f}"
            general = "—" if r["general_at_0.9x"] is None else f"{r['general_at_0.9x']:.3f}"
            lines.append(f"| {method} | {r['size']} | {r['base_general']:.3f} | {r['gain']:.3f} | {100 * r['degradation']:.1f}% | {ratio} | "
                         f"{general} | {cell(r['minus_sft_at_0.9x'])} |")
    return "\n".join(lines) + "\n"


def render_study(by_regime: dict, seeds: dict, lr: float, results_path: str, settings: str, *, plot_suffix: str = "",
                 small_by_regime: dict | None = None, small_model: str = "", size_methods: tuple[str, ...] = ()) -> tuple[str, dict]:
    """``by_regime``: {regime: [results per seed]}, the seeds of each regime in ``seeds``.
    Returns (the markdown text, from the ``settings`` line on; the summary: lr, groups,
    per-method records, teacher tracking); the Pareto plots go to results/ beside
    ``results_path``, which the text links them from. With ``small_by_regime``
    (``small_model``'s runs on the same seeds) also the two sizes side by side for
    ``size_methods`` (the summary's size_comparison)."""
    links_from = os.path.dirname(results_path) or "."
    plot_dir = os.path.join(links_from, "results")
    os.makedirs(plot_dir, exist_ok=True)
    sections, records_all, tracking, size_rows = [settings, ""], [], {}, {}
    for regime, runs in by_regime.items():
        records = summarize_regime(runs, regime, list(seeds[regime]))
        records_all += records
        tracking[regime] = teacher_tracking(runs)
        title = f"regime {regime}, lr {lr:g}, {len(runs)} seed(s)"
        plot = plot_frontiers(runs, os.path.join(plot_dir, f"forgetting_study{plot_suffix}_{regime}.png"), f"Pareto frontiers, {title}")
        sections += [markdown_tables(runs, title), "General accuracy at 0.9x the teacher's target accuracy, paired across seeds "
                     "(method − other, same base and teacher per seed; 95% Student t-interval):", "", paired_table(records),
                     "Where each student ends against its own teacher (final checkpoints, paired per seed):", "",
                     tracking_table(tracking[regime]),
                     f"![Pareto frontiers, {title}]({os.path.relpath(plot, links_from)})", ""]
        if small_by_regime is not None:
            small = small_by_regime[regime]
            rows = size_comparison({"small": (small, summarize_regime(small, regime, list(seeds[regime]))), "large": (runs, records)},
                                   size_methods)
            size_rows[regime] = rows
            sections += [f"The small model ({small_model}) and this one on the same "
                         f"seeds {list(seeds[regime])}, regime {regime} (degradation: mean over seeds of the final checkpoint's relative loss "
                         "of general accuracy; its ratio to SFT's is a ratio of those means):", "", size_table(rows, size_methods)]
    summary = {"lr": lr, "groups": {k: list(v) for k, v in seeds.items()}, "records": records_all, "teacher_tracking": tracking,
               **({"size_comparison": size_rows} if size_rows else {})}
    return "\n".join(sections), summary
