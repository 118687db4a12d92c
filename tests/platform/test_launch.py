"""The local N-rank launcher: results in rank order with torchrun's environment, and a report
naming every rank's fate when one raises, exits or hangs."""

import os
import time

import pytest

from anchored_megatron.platform import RankFailure, run_on_ranks


def report_environment(offset):
    return {key: os.environ[key] for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")} | {"value": int(os.environ["RANK"]) + offset}


def wait_forever():
    while True:
        time.sleep(0.1)  # stands for a collective waiting on rank 0


def raise_on_rank_zero_and_hang_elsewhere():
    if os.environ["RANK"] == "0":
        raise ValueError("rank zero gave up")
    wait_forever()


def exit_on_rank_one():
    if os.environ["RANK"] == "1":
        os._exit(17)
    return "fine"


@pytest.mark.distributed
def test_results_come_back_in_rank_order_with_torchrun_variables():
    results = run_on_ranks(report_environment, 2, 10, threads=1)
    assert results == [{"RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r), "MASTER_ADDR": "127.0.0.1", "value": 10 + r} for r in range(2)]


@pytest.mark.distributed
def test_failure_report_holds_the_traceback_and_the_hung_rank_stack():
    with pytest.raises(RankFailure) as failure:
        run_on_ranks(raise_on_rank_zero_and_hang_elsewhere, 2, threads=1, timeout=120)
    rank_zero, rank_one = str(failure.value).split("--- rank 1: ")
    assert "--- rank 0: raised" in rank_zero and "ValueError: rank zero gave up" in rank_zero
    assert rank_one.startswith("no result, hung (killed)")
    assert "in wait_forever" in rank_one  # its stack dump shows where it waited


@pytest.mark.distributed
def test_failure_report_names_the_exit_code_of_a_rank_that_died():
    with pytest.raises(RankFailure, match="rank 1: no result, exit code 17"):
        run_on_ranks(exit_on_rank_one, 2, threads=1, timeout=120)
