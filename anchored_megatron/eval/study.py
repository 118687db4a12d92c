"""Statistics of the forgetting study: which method forgets least at a given gain.

Inputs are the experiment's results per seed (``run_experiment``'s dict: job name -> points).
Per method and seed a curve of checkpoints (target accuracy, general accuracy), from the base;
from it:

- the Pareto frontier (checkpoints no other checkpoint of the method beats on both axes);
- general accuracy at matched target accuracy: where the curve first reaches 0.75x / 0.9x /
  1.0x the teacher's target accuracy (linear between checkpoints), the level each seed's own
  teacher sets;
- paired differences against sft, sft_kl, distill and sft_replay: per seed (same base, data and teacher)
  the method's value minus the other's, then the mean and a 95% Student t-interval over the
  seeds where both reached the level;
- degradation at 90% of SFT's gain: the relative loss of general accuracy where the curve first
  reaches the base's target accuracy plus 0.9 x the final SFT checkpoint's gain;
- teacher tracking: how far each method trained toward a teacher ends from its own teacher.

Method ids: the experiment's job names, plus ``sft_early`` (the SFT curve up to early-stopped SFT's
checkpoint, chosen by ``report.sft_early_index``) and ``teacher`` (base -> teacher).
"""

from __future__ import annotations

import math
import statistics

from anchored_megatron.eval.report import SFT_EARLY, curve, general_accuracy, general_at_target, sft_early_index
from anchored_megatron.eval.scoring import TARGET

FRACTIONS = {0.75: "0.75x", 0.9: "0.9x", 1.0: "1.0x"}  # of the teacher's target accuracy, and their key suffixes
# sft_replay: the control for replay variants (the same extra data, no trust region).
COMPARED_WITH = ("sft", "sft_kl", "distill", "sft_replay")
SFT_GAIN_FRACTION = 0.9
NOT_METHODS = ("base", "teacher_sftkl", "teacher_early")  # jobs that are inputs of methods, not methods
# Anchored variants whose loss also pulls toward something other than the teacher (the base, general
# data): left out of the pooled teacher-tracking correlation, which asks whether the teacher alone
# sets where the student ends.
NOT_TEACHER_ONLY = ("anchored_base_kl", "anchored_replay")

# Two-sided 95% Student t critical values t_{0.975, df} for df = 1..30 (standard tables); the
# normal quantile 1.96 beyond.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_critical_975(df: int) -> float:
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    return _T975[df - 1] if df <= len(_T975) else 1.96


def mean_interval(values: list[float]) -> dict:
    """{"mean", "ci_low", "ci_high", "n"}: a 95% t-interval for the mean (None bounds below 2 values)."""
    n = len(values)
    if n == 0:
        return {"mean": None, "ci_low": None, "ci_high": None, "n": 0}
    mean = statistics.fmean(values)
    if n == 1:
        return {"mean": mean, "ci_low": None, "ci_high": None, "n": 1}
    half = t_critical_975(n - 1) * statistics.stdev(values) / math.sqrt(n)
    return {"mean": mean, "ci_low": mean - half, "ci_high": mean + half, "n": n}


def pareto_frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (target, general) points no other point matches or beats on both axes, by target."""
    frontier = []
    for target, general in sorted(set(points), key=lambda p: (-p[0], -p[1])):
        if not frontier or general > frontier[-1][1]:
            frontier.append((target, general))
    return sorted(frontier)


def method_curve(results: dict, method: str) -> list[tuple[float, float, float]]:
    """(epoch, target, general) from the base along the method's checkpoints."""
    if method == "teacher":
        return curve(results, "teacher")[:1] + curve(results, "teacher")[-1:]
    if method == SFT_EARLY:
        # The base, then the SFT checkpoints up to and including the selected one.
        return curve(results, "sft")[: 2 + sft_early_index(results["sft"]["points"])]
    return curve(results, method)


def methods_of(runs: list[dict]) -> list[str]:
    """Methods present in every seed's results, in the experiment's order (+ sft_early, teacher)."""
    names = [m for m in runs[0] if m not in NOT_METHODS and all(m in r for r in runs)]
    if "sft" in names:
        names.insert(names.index("sft") + 1, SFT_EARLY)
    return names


def _per_seed(results: dict, method: str) -> dict:
    base = results["base"]["points"][-1]
    base_general, base_target = general_accuracy(base), base["accuracy"][TARGET]
    teacher_target = results["teacher"]["points"][-1]["accuracy"][TARGET]
    points = method_curve(results, method)
    final = points[-1]
    sft_gain = curve(results, "sft")[-1][1] - base_target if "sft" in results else None

    def degradation(general):
        return None if general is None or base_general <= 0 else (base_general - general) / base_general

    at_sft_gain = None
    if sft_gain is not None and sft_gain > 0:
        at_sft_gain = degradation(general_at_target(points, base_target + SFT_GAIN_FRACTION * sft_gain))
    return {
        "gain": final[1] - base_target,
        "degradation": degradation(final[2]),
        "general": {f: general_at_target(points, f * teacher_target) for f in FRACTIONS},
        "degradation_at_sft_gain": at_sft_gain,
        "frontier": pareto_frontier([(p[1], p[2]) for p in points]),
    }


def _mean(values) -> float | None:
    kept = [v for v in values if v is not None]
    return statistics.fmean(kept) if kept else None


def summarize_regime(runs: list[dict], regime: str, seeds: list[int]) -> list[dict]:
    """One record per method: means over seeds, and paired differences against COMPARED_WITH."""
    methods = methods_of(runs)
    per_seed = {m: [_per_seed(r, m) for r in runs] for m in methods}
    records = []
    for m in methods:
        rows = per_seed[m]
        record = {
            "method": m, "regime": regime, "seeds": list(seeds),
            "gain": _mean(r["gain"] for r in rows),
            "degradation": _mean(r["degradation"] for r in rows),
            "degradation_at_0.9_sft_gain": _mean(r["degradation_at_sft_gain"] for r in rows),
            "reached_0.9_sft_gain": sum(r["degradation_at_sft_gain"] is not None for r in rows),
            "frontier_per_seed": [r["frontier"] for r in rows],
        }
        for f, label in FRACTIONS.items():
            record[f"general_at_{label}"] = _mean(r["general"][f] for r in rows)
            record[f"reached_{label}"] = sum(r["general"][f] is not None for r in rows)
            for other in COMPARED_WITH:
                if other not in per_seed or other == m:
                    continue
                diffs = [a["general"][f] - b["general"][f] for a, b in zip(rows, per_seed[other])
                         if a["general"][f] is not None and b["general"][f] is not None]
                record.setdefault(f"paired_diff_at_{label}", {})[other] = mean_interval(diffs)
        records.append(record)
    return records


def _pearson(xs: list[float], ys: list[float]) -> float | None:
    if len(xs) < 3 or statistics.pstdev(xs) == 0 or statistics.pstdev(ys) == 0:
        return None
    return statistics.correlation(xs, ys)


def teacher_tracking(runs: list[dict]) -> dict:
    """Does a student end where its own teacher is? For every method trained toward a teacher
    (its ``depends["reference"]`` is a ``teacher*`` job: the teacher, or one made another way),
    per seed its final general and target accuracy minus its teacher's, as paired 95%
    t-intervals; and, pooled over the teacher-only anchored methods (not NOT_TEACHER_ONLY) and
    seeds, the correlation of the student's final general accuracy with its teacher's (the
    teachers differ by seed and by how they were made, which is what spreads them). A method
    that only reaches its teacher shows differences near 0 whatever the teacher, and a
    correlation near 1."""
    teachers = {m: runs[0][m].get("depends", {}).get("reference", "") for m in methods_of(runs) if m in runs[0]}
    records, pooled = [], ([], [])
    for m, teacher_job in teachers.items():
        if not teacher_job.startswith("teacher"):
            continue
        general_diffs, target_diffs = [], []
        for results in runs:
            teacher = results[teacher_job]["points"][-1]
            final = results[m]["points"][-1]
            general_diffs.append(general_accuracy(final) - general_accuracy(teacher))
            target_diffs.append(final["accuracy"][TARGET] - teacher["accuracy"][TARGET])
            if m.startswith("anchored") and m not in NOT_TEACHER_ONLY:
                pooled[0].append(general_accuracy(teacher))
                pooled[1].append(general_accuracy(final))
        records.append({"method": m, "teacher": teacher_job,
                        "general_minus_teacher": mean_interval(general_diffs), "target_minus_teacher": mean_interval(target_diffs)})
    return {"methods": records, "anchored_general_vs_teacher_general": {"r": _pearson(*pooled), "n": len(pooled[0]),
                                                                        "teacher_general": pooled[0], "student_general": pooled[1]}}


def plot_frontiers(runs: list[dict], path: str, title: str) -> str:
    """Every method's Pareto frontier of seed-averaged checkpoints (target vs general)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = methods_of(runs)
    fig, ax = plt.subplots(figsize=(8.0, 5.6), dpi=110)
    colors = plt.get_cmap("tab20")
    for i, m in enumerate(methods):
        curves = [method_curve(r, m) for r in runs]
        length = min(len(c) for c in curves)
        averaged = [(statistics.fmean(c[k][1] for c in curves), statistics.fmean(c[k][2] for c in curves)) for k in range(length)]
        frontier = pareto_frontier(averaged)
        ax.plot([p[0] for p in frontier], [p[1] for p in frontier], marker="o", markersize=3, color=colors(i % 20),
                linestyle="--" if m.startswith(("wise_ft", "sft")) else "-", label=m)
    ax.set_xlabel("target accuracy (mean over seeds)")
    ax.set_ylabel("general accuracy (mean over seeds)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
