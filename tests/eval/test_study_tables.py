"""The study's markdown cells and tables, against strings written out by hand."""

from anchored_megatron.eval.study_tables import cell, paired_table


def test_cell_shows_mean_interval_and_count():
    assert cell({"mean": 0.1, "ci_low": 0.05, "ci_high": 0.15, "n": 3}) == "+0.100 [+0.050, +0.150] (n=3)"
    assert cell({"mean": -0.02, "ci_low": None, "ci_high": None, "n": 1}) == "-0.020 (n=1)"
    assert cell({"mean": None, "ci_low": None, "ci_high": None, "n": 0}) == "—"
    assert cell(None) == "—"


def test_paired_table_row():
    record = {"method": "anchored", "seeds": [0, 1], "reached_0.9x": 2, "general_at_0.9x": 0.514,
              "degradation_at_0.9_sft_gain": None, "reached_0.9_sft_gain": 0,
              "paired_diff_at_0.9x": {"sft": {"mean": 0.14, "ci_low": 0.1, "ci_high": 0.2, "n": 2}}}
    row = paired_table([record]).splitlines()[2]
    assert row == "| anchored | 2/2 | 0.514 | +0.140 [+0.100, +0.200] (n=2) | — | — | — | — |"
