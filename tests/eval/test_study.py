"""The forgetting study's statistics on a hand-made experiment, against the numbers worked out
here: interpolation between checkpoints, paired differences, t-intervals, Pareto frontiers."""

import math

import pytest

from anchored_megatron.eval.study import mean_interval, pareto_frontier, summarize_regime, teacher_tracking


def _point(target, general, epoch):
    # Two general skills whose mean is ``general``.
    return {"epoch": epoch, "accuracy": {"target": target, "add": general + 0.05, "rev": general - 0.05}}


def _seed(shift):
    """base (0.0, 0.60); teacher (0.50, 0.50); sft and anchored checkpoints at epochs 5 and 10;
    every general accuracy of the methods moved by ``shift`` (one seed's luck)."""
    def job(points):
        return {"points": [_point(t, g + shift, e) for t, g, e in points]}

    return {
        "base": {"points": [_point(0.0, 0.60, 0)]},
        "teacher": {"points": [_point(0.50, 0.50, 3)]},
        "sft": job([(0.40, 0.40, 5), (0.60, 0.30, 10)]),
        "anchored": job([(0.30, 0.55, 5), (0.50, 0.50, 10)]),
        "distill": job([(0.20, 0.58, 5), (0.40, 0.52, 10)]),
    }


def test_paired_differences_and_intervals_match_the_hand_computation():
    shifts = (0.00, 0.02, -0.01)
    records = {r["method"]: r for r in summarize_regime([_seed(s) for s in shifts], "C", [0, 1, 2])}
    assert list(records) == ["teacher", "sft", "sft_early", "anchored", "distill"]
    # 0.9x the teacher = target 0.45. SFT: between (0.40, 0.40) and (0.60, 0.30): 0.40 - 0.10 * 0.05 / 0.20 = 0.375.
    # anchored: between (0.30, 0.55) and (0.50, 0.50): 0.55 - 0.05 * 0.15 / 0.20 = 0.5125. Shifted alike per seed.
    sft = [0.375 + s for s in shifts]
    anchored = [0.5125 + s for s in shifts]
    assert records["sft"]["general_at_0.9x"] == pytest.approx(sum(sft) / 3)
    assert records["anchored"]["general_at_0.9x"] == pytest.approx(sum(anchored) / 3)
    # The paired difference is the same in every seed: mean 0.1375, zero-width interval.
    diff = records["anchored"]["paired_diff_at_0.9x"]["sft"]
    assert diff == pytest.approx({"mean": 0.1375, "ci_low": 0.1375, "ci_high": 0.1375, "n": 3})
    # distill never reaches 1.0x the teacher (0.50): no value, no pair.
    assert records["distill"]["general_at_1.0x"] is None and records["distill"]["reached_1.0x"] == 0
    assert records["anchored"]["paired_diff_at_1.0x"]["distill"]["n"] == 0
    # Degradation at 90% of SFT's gain (target 0.54): SFT between its checkpoints, general 0.40 - 0.10 * 0.14 / 0.20 = 0.33,
    # (0.60 - 0.33 - s) / 0.60 per seed; anchored never gets there.
    expected = sum((0.60 - (0.33 + s)) / 0.60 for s in shifts) / 3
    assert records["sft"]["degradation_at_0.9_sft_gain"] == pytest.approx(expected)
    assert records["anchored"]["degradation_at_0.9_sft_gain"] is None
    # Early-stopped SFT stops at the first checkpoint at 95% of the best target (0.60 * 0.95 = 0.57): the second.
    assert records["sft_early"]["gain"] == pytest.approx(0.60)
    # The teacher's curve is base -> teacher: at 0.9x, 0.60 - 0.10 * 0.45 / 0.50 = 0.51 (the teacher is not shifted).
    assert records["teacher"]["general_at_0.9x"] == pytest.approx(0.51)


def test_mean_interval_is_the_student_t_interval():
    values = [0.1, 0.2, 0.3]
    # mean 0.2, sample sd 0.1, t(0.975, 2) = 4.303 from the tables.
    half = 4.303 * 0.1 / math.sqrt(3)
    assert mean_interval(values) == pytest.approx({"mean": 0.2, "ci_low": 0.2 - half, "ci_high": 0.2 + half, "n": 3})
    assert mean_interval([0.4]) == {"mean": 0.4, "ci_low": None, "ci_high": None, "n": 1}
    assert mean_interval([])["mean"] is None


def test_pareto_frontier_keeps_the_undominated_checkpoints():
    points = [(0.1, 0.9), (0.2, 0.8), (0.2, 0.7), (0.3, 0.85), (0.5, 0.4), (0.4, 0.3)]
    assert pareto_frontier(points) == [(0.1, 0.9), (0.3, 0.85), (0.5, 0.4)]


def _tracking_seed(teacher_general, other_teacher_general, student_offset):
    """Two teachers (target 0.5 each); 'anchored' trained toward the first ends at its general
    accuracy + ``student_offset`` and target 0.45, 'anchored_ref_x' toward the second exactly at
    it; 'sft' and 'sft_kl' have no teacher and must be left out."""
    def job(target, general, depends):
        return {"points": [_point(target, general, 10)], "depends": depends}

    return {
        "base": {"points": [_point(0.0, 0.60, 0)], "depends": {}},
        "teacher": job(0.5, teacher_general, {"student": "base"}),
        "teacher_x": job(0.5, other_teacher_general, {"student": "base", "reference": "base"}),
        "sft": job(0.6, 0.3, {"student": "base"}),
        "sft_kl": job(0.6, 0.4, {"student": "base", "reference": "base"}),
        "anchored": job(0.45, teacher_general + student_offset, {"student": "base", "reference": "teacher"}),
        "anchored_ref_x": job(0.5, other_teacher_general, {"student": "base", "reference": "teacher_x"}),
        # Pulled toward general data too: tracked against its teacher, left out of the pooled correlation.
        "anchored_replay": job(0.5, 0.7, {"student": "base", "reference": "teacher"}),
    }


def test_teacher_tracking_pairs_each_student_with_its_own_teacher():
    seeds = [(0.50, 0.55, 0.01), (0.46, 0.58, 0.03), (0.52, 0.54, -0.01)]
    tracking = teacher_tracking([_tracking_seed(*s) for s in seeds])
    by_method = {r["method"]: r for r in tracking["methods"]}
    assert sorted(by_method) == ["anchored", "anchored_ref_x", "anchored_replay"]
    assert by_method["anchored_replay"]["general_minus_teacher"]["mean"] == pytest.approx(0.7 - (0.50 + 0.46 + 0.52) / 3)
    assert by_method["anchored_ref_x"]["teacher"] == "teacher_x"
    # anchored minus its teacher: the offsets 0.01, 0.03, -0.01 (mean 0.01, sd 0.02, t(0.975, 2) = 4.303).
    half = 4.303 * 0.02 / math.sqrt(3)
    assert by_method["anchored"]["general_minus_teacher"] == pytest.approx({"mean": 0.01, "ci_low": 0.01 - half, "ci_high": 0.01 + half, "n": 3})
    assert by_method["anchored"]["target_minus_teacher"]["mean"] == pytest.approx(-0.05)
    assert by_method["anchored_ref_x"]["general_minus_teacher"] == pytest.approx({"mean": 0.0, "ci_low": 0.0, "ci_high": 0.0, "n": 3})
    # Pooled: the six (teacher, student) pairs, method by method, Pearson r written out.
    xs = [0.50, 0.46, 0.52, 0.55, 0.58, 0.54]
    ys = [0.51, 0.49, 0.51, 0.55, 0.58, 0.54]
    mx, my = sum(xs) / 6, sum(ys) / 6
    r = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / math.sqrt(sum((x - mx) ** 2 for x in xs) * sum((y - my) ** 2 for y in ys))
    pooled = tracking["anchored_general_vs_teacher_general"]
    assert pooled["n"] == 6 and pooled["r"] == pytest.approx(r)
    assert pooled["teacher_general"] == pytest.approx(xs) and pooled["student_general"] == pytest.approx(ys)
