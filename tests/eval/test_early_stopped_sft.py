"""Early-stopped SFT is one rule: the report's row and the study's curve stop at the same SFT
checkpoint, the one picked here by hand."""

from anchored_megatron.eval.report import SFT_EARLY, sft_early_index, summarize
from anchored_megatron.eval.study import method_curve


def _point(target, general, epoch):
    return {"epoch": epoch, "accuracy": {"target": target, "add": general, "rev": general}}


def _results():
    # Best SFT target 0.60; 95% of it is 0.57: epoch 10 (0.58) is the first to reach it, epoch 5 (0.56) is not.
    return {
        "base": {"points": [_point(0.0, 0.6, 0)]},
        "teacher": {"points": [_point(0.5, 0.5, 3)]},
        "sft": {"points": [_point(0.56, 0.5, 5), _point(0.58, 0.45, 10), _point(0.60, 0.4, 15), _point(0.59, 0.35, 20)]},
    }


def test_the_earliest_checkpoint_at_95_percent_of_the_best_target_is_chosen():
    assert sft_early_index(_results()["sft"]["points"]) == 1
    # A checkpoint exactly at 95% of the best counts.
    assert sft_early_index([_point(0.5, 0, 1), _point(0.95, 0, 2), _point(1.0, 0, 3)]) == 1


def test_report_row_and_study_curve_end_at_the_same_checkpoint():
    results = _results()
    assert summarize(results)[SFT_EARLY]["epoch"] == 10
    curve = method_curve(results, SFT_EARLY)
    # The base, then SFT's checkpoints up to epoch 10.
    assert [p[0] for p in curve] == [0.0, 5, 10]
    assert curve[-1][1:] == (0.58, 0.45)
