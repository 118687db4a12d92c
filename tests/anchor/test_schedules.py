import pytest

from anchored_megatron.anchor import alpha_at


def test_constant_schedule_returns_start_every_iteration():
    assert [alpha_at(t, 5, 0.5, kind="constant") for t in range(5)] == [0.5] * 5


def test_linear_schedule_runs_from_start_to_end_evenly():
    values = [alpha_at(t, 5, 0.2, 0.6, kind="linear") for t in range(5)]
    assert values == pytest.approx([0.2, 0.3, 0.4, 0.5, 0.6])


def test_linear_schedule_with_one_iteration_uses_start():
    assert alpha_at(0, 1, 0.3, 0.9, kind="linear") == 0.3


@pytest.mark.parametrize("call, name", [
    (lambda: alpha_at(0, 5, 1.5), "start"),
    (lambda: alpha_at(0, 5, 0.5, -0.1, kind="linear"), "end"),
    (lambda: alpha_at(0, 5, 0.5, kind="cosine"), "kind"),
    (lambda: alpha_at(5, 5, 0.5), "iteration"),
    (lambda: alpha_at(0, 0, 0.5), "num_iterations"),
    (lambda: alpha_at(0, 5, 0.5, kind="linear"), "end"),
])
def test_bad_schedule_arguments_name_the_argument(call, name):
    with pytest.raises(ValueError, match=name):
        call()
