"""The gain / degradation report: markdown tables and a trade-off plot.

Definitions (see docs/results.md): ``general`` = mean accuracy over the general skills;
``gain`` = target accuracy - the base's; ``degradation`` = (base general - general) / base
general, overall and per skill. Early-stopped SFT (method id ``sft_early``, the id the study's
records use too) = the earliest SFT checkpoint whose target accuracy reaches 95% of the best SFT
checkpoint's (selected on the evaluation set itself, which flatters it slightly): ``sft_early_index``,
the one place the rule is written.
"""

from __future__ import annotations

import math
import statistics

from anchored_megatron.eval.scoring import TARGET

# Early-stopped SFT: a method made from the SFT run's curve, not a job of its own.
SFT_EARLY = "sft_early"
SFT_EARLY_FRACTION = 0.95  # of the best SFT checkpoint's target accuracy

LABELS = {
    "sft": "SFT", SFT_EARLY: "early-stopped SFT", "sft_kl": "SFT+KL(base)", "distill": "distill (α=1)",
    "anchored": "anchored (snapshot)", "anchored_live": "anchored (live)", "anchored_a3": "anchored α=0.3, K=2",
    "teacher": "teacher (short SFT)", "dft": "DFT", "asft": "ASFT (DFT+KL(base))", "taid": "TAID",
    "anchored_ref_sftkl": "anchored, teacher by SFT+KL", "anchored_ref_early": "anchored, 1-epoch teacher",
    "anchored_base_kl": "anchored + KL(base)", "anchored_reset": "anchored, optimizer reset", "anchored_ramp": "anchored, α 0.2→0.8",
    "anchored_replay": "anchored + replay trust region",
    "teacher_sftkl": "teacher by SFT+KL (short)", "teacher_early": "teacher, 1 epoch",
    "wise_ft_r0.25": "WiSE-FT r=0.25", "wise_ft_r0.5": "WiSE-FT r=0.5", "wise_ft_r0.75": "WiSE-FT r=0.75",
}
# Table order; a method shows when the runs have it.
TABLE_METHODS = ("teacher", "teacher_sftkl", "teacher_early", "sft", SFT_EARLY, "sft_kl", "distill", "dft", "asft", "taid", "wise_ft_r0.25", "wise_ft_r0.5",
                 "wise_ft_r0.75", "anchored", "anchored_live", "anchored_a3", "anchored_ref_sftkl", "anchored_ref_early",
                 "anchored_base_kl", "anchored_reset", "anchored_ramp", "anchored_replay")
CURVE_METHODS = tuple(m for m in TABLE_METHODS if not m.startswith("teacher") and m != SFT_EARLY)


def sft_early_index(sft_points: list[dict]) -> int:
    """Index in the SFT run's points of early-stopped SFT's checkpoint: the earliest whose target
    accuracy reaches SFT_EARLY_FRACTION of the best one's."""
    best = max(p["accuracy"][TARGET] for p in sft_points)
    return next(i for i, p in enumerate(sft_points) if p["accuracy"][TARGET] >= SFT_EARLY_FRACTION * best)


def general_accuracy(point: dict) -> float:
    skills = [k for k in point["accuracy"] if k != TARGET]
    return sum(point["accuracy"][k] for k in skills) / len(skills)


def curve(results: dict, method: str) -> list[tuple[float, float, float]]:
    """(epoch, target, general) along a method's checkpoints, starting at the base."""
    base = results["base"]["points"][-1]
    points = [(0.0, base["accuracy"][TARGET], general_accuracy(base))]
    for p in results[method]["points"]:
        points.append((p["epoch"], p["accuracy"][TARGET], general_accuracy(p)))
    return points


def final_points(results: dict) -> dict[str, dict]:
    """method -> the point it ends at (early-stopped SFT: the selected SFT checkpoint)."""
    finals = {}
    methods = [m for m in results if m not in ("base",)]
    for m in methods:
        finals[m] = results[m]["points"][-1]
    if "sft" in results and results["sft"]["points"]:
        pts = results["sft"]["points"]
        finals[SFT_EARLY] = pts[sft_early_index(pts)]
    return finals


def summarize(results: dict) -> dict[str, dict]:
    """method -> {epoch, target, target_answer, gain, general, degradation, per_skill_degradation}."""
    base = results["base"]["points"][-1]
    base_general = general_accuracy(base)
    out = {}
    for m, p in final_points(results).items():
        general = general_accuracy(p)
        out[m] = {
            "epoch": p["epoch"],
            "target": p["accuracy"][TARGET],
            "target_answer": p.get("target_answer", float("nan")),
            "gain": p["accuracy"][TARGET] - base["accuracy"][TARGET],
            "general": general,
            "degradation": (base_general - general) / base_general if base_general > 0 else float("nan"),
            "per_skill": {
                k: (base["accuracy"][k] - v) / base["accuracy"][k] if base["accuracy"][k] > 0 else float("nan")
                for k, v in p["accuracy"].items() if k != TARGET
            },
        }
    return out


def general_at_target(points: list[tuple[float, float, float]], level: float) -> float | None:
    """General accuracy where the curve first reaches target accuracy ``level`` (linear
    interpolation between checkpoints); None if it never does."""
    for (_, t0, g0), (_, t1, g1) in zip(points, points[1:]):
        if t0 < level <= t1:
            return g0 + (g1 - g0) * (level - t0) / (t1 - t0)
    if points and points[0][1] >= level:
        return points[0][2]
    return None


def _pm(values: list[float], spec=".3f") -> str:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return "—"
    if len(values) == 1:
        return format(values[0], spec)
    return f"{format(statistics.mean(values), spec)} ± {format(statistics.stdev(values), spec)}"


def _pct(values: list[float], spec=".0f") -> str:
    text = _pm(values, spec)
    return text if text == "—" else text + "%"


def markdown_tables(runs: list[dict], title: str = "") -> str:
    """Final points and general accuracy at matched target accuracy; mean ± std over runs
    (seeds) when there are several."""
    summaries = [summarize(r) for r in runs]
    methods = [m for m in TABLE_METHODS if m in summaries[0]]
    skills = [k for k in runs[0]["base"]["points"][-1]["accuracy"] if k != TARGET]
    base_pts = [r["base"]["points"][-1] for r in runs]
    lines = []
    if title:
        lines += [f"### {title}", ""]
    n = len(runs)
    lines.append(f"Base: general {_pm([general_accuracy(p) for p in base_pts])}, target (fine-tuning format) "
                 f"{_pm([p['accuracy'][TARGET] for p in base_pts])}, target answer in any format {_pm([p.get('target_answer') for p in base_pts])}"
                 + (f"; {n} seeds, mean ± std" if n > 1 else "; one seed"))
    if "entropy" in base_pts[0]:
        lines.append("Base mean per-token entropy on its own responses (nats): "
                     + ", ".join(f"{k} {_pm([p['entropy'][k] for p in base_pts], '.2f')}" for k in base_pts[0]["entropy"]))
    lines += ["", "| method | epochs | target | gain | answer (any format) | general | degradation | " + " | ".join(f"deg. {s}" for s in skills) + " |",
              "| --- " * (7 + len(skills)) + "|"]
    for m in methods:
        rows = [s[m] for s in summaries]
        lines.append(
            f"| {LABELS.get(m, m)} | {_pm([r['epoch'] for r in rows], '.0f')} | {_pm([r['target'] for r in rows])} | {_pm([r['gain'] for r in rows])} | "
            f"{_pm([r['target_answer'] for r in rows])} | {_pm([r['general'] for r in rows])} | {_pct([100 * r['degradation'] for r in rows], '.1f')} | "
            + " | ".join(_pct([100 * r["per_skill"][s] for r in rows]) for s in skills) + " |"
        )
    # Matched target accuracy: fractions of the teacher's target accuracy.
    curve_methods = [m for m in CURVE_METHODS if m in runs[0]]
    fractions = (0.5, 0.75, 0.9, 1.0)
    lines += ["", "General accuracy at matched target accuracy (fraction of the teacher's target accuracy; "
              "interpolated between checkpoints; — = never reached):", "",
              "| method | " + " | ".join(f"{f:.2f}× teacher" for f in fractions) + " |", "| --- " * (1 + len(fractions)) + "|"]
    for m in curve_methods:
        cells = []
        for f in fractions:
            values = [general_at_target(curve(r, m), f * r["teacher"]["points"][-1]["accuracy"][TARGET]) for r in runs]
            reached = [v for v in values if v is not None]
            cell = _pm(reached) if reached else "—"
            if reached and len(reached) < len(values):
                cell += f" ({len(reached)}/{len(values)} runs)"
            cells.append(cell)
        lines.append(f"| {LABELS.get(m, m)} | " + " | ".join(cells) + " |")
    lines += ["", bar_verdict(summaries)]
    return "\n".join(lines) + "\n"


def bar_verdict(summaries: list[dict]) -> str:
    """The method's claim as a bar: anchored degradation <= half of SFT's at >= 90% of SFT's gain (means over runs)."""
    if not all("anchored" in s and "sft" in s for s in summaries):
        return "Bar (anchored vs SFT): not evaluated (anchored or SFT missing)."
    mean = lambda key, m: statistics.mean(s[m][key] for s in summaries)  # noqa: E731
    deg_a, deg_s, gain_a, gain_s = mean("degradation", "anchored"), mean("degradation", "sft"), mean("gain", "anchored"), mean("gain", "sft")
    if math.isnan(deg_a) or math.isnan(deg_s) or gain_s <= 0:
        return ("Bar (anchored vs SFT): cannot be evaluated here (base general accuracy 0 or no SFT gain): "
                f"SFT gain {gain_s:.3f}, anchored gain {gain_a:.3f}.")
    met = deg_a <= 0.5 * deg_s and gain_a >= 0.9 * gain_s
    return (f"Bar (anchored degradation <= 1/2 of SFT's at >= 90% of SFT's gain): **{'met' if met else 'not met'}** — "
            f"degradation {100 * deg_a:.1f}% vs SFT {100 * deg_s:.1f}%, gain {gain_a:.3f} vs SFT {gain_s:.3f}.")


def plot_tradeoff(runs: list[dict], path: str, title: str = "") -> str:
    """General vs. target accuracy along each method's checkpoints (first run's curve; the
    other runs' final points as faint markers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=110)
    methods = [m for m in CURVE_METHODS if m in runs[0]]
    for i, m in enumerate(methods):
        color = f"C{i}"
        for j, r in enumerate(runs):
            pts = curve(r, m)
            ax.plot([p[1] for p in pts], [p[2] for p in pts], marker="o", markersize=3, color=color,
                    alpha=1.0 if j == 0 else 0.35, label=LABELS.get(m, m) if j == 0 else None)
    for j, r in enumerate(runs):
        base, teacher = r["base"]["points"][-1], r["teacher"]["points"][-1]
        ax.scatter([base["accuracy"][TARGET]], [general_accuracy(base)], marker="s", color="black", zorder=5, label="base" if j == 0 else None)
        ax.scatter([teacher["accuracy"][TARGET]], [general_accuracy(teacher)], marker="*", s=90, color="gray", zorder=5, label="teacher" if j == 0 else None)
    ax.set_xlabel("target accuracy (fine-tuning format, exact)")
    ax.set_ylabel("general accuracy (mean over skills)")
    ax.set_title(title or "gain vs. stability over checkpoints")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
