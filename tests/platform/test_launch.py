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


def write_pid_and_wait(directory):
    # A multiprocessing child, as Megatron's async checkpoint writer starts one (a Manager server).
    import multiprocessing

    manager = multiprocessing.get_context("spawn").Manager()
    with open(os.path.join(directory, f"rank{os.environ['RANK']}.pid"), "w") as fh:
        fh.write(f"{os.getpid()} {manager._process.pid}")
    wait_forever()


LAUNCHER = """
import sys
from anchored_megatron.platform import run_on_ranks
from tests.platform.test_launch import write_pid_and_wait
run_on_ranks(write_pid_and_wait, 2, sys.argv[1], threads=1, timeout=600)
"""


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


@pytest.mark.distributed
def test_ranks_end_within_seconds_of_a_killed_launcher(tmp_path):
    """The ranks fork from a fork server that outlives the launcher: they must watch the
    launcher itself, not their parent; and take their own multiprocessing children along."""
    import signal
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(tmp_path)], cwd=root, env=dict(os.environ, PYTHONPATH=root),
                                stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while len(list(tmp_path.glob("rank*.pid"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        ranks = [int(pid) for r in range(2) for pid in (tmp_path / f"rank{r}.pid").read_text().split()]  # each rank and its child
        assert all(_alive(pid) for pid in ranks)
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        killed_at = time.monotonic()
        while any(_alive(pid) for pid in ranks) and time.monotonic() < killed_at + 30:
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in ranks), "the ranks or their children outlived the launcher"
        assert time.monotonic() - killed_at < 10
    finally:
        launcher.kill()
        launcher.wait()


def start_the_checkpoint_writer_queue_and_get_killed(directory):
    """As a rank the OOM killer ends mid-run: Megatron's async writer has started its Manager
    server (through its own queue getter), then SIGKILL, so no cleanup of any kind runs."""
    import signal

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from anchored_megatron.platform import mcore_compat

    mcore_compat.apply()
    getter = getattr(filesystem_async, "get_write_results_queue", None) or filesystem_async._get_write_results_queue
    queue = getter()
    with open(os.path.join(directory, "manager.pid"), "w") as fh:
        fh.write(str(queue._manager._process.pid))
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.distributed
def test_the_checkpoint_writers_manager_server_ends_with_a_killed_rank(tmp_path):
    with pytest.raises(RankFailure, match="rank 0: no result"):
        run_on_ranks(start_the_checkpoint_writer_queue_and_get_killed, 1, str(tmp_path), threads=1, timeout=120)
    server = int((tmp_path / "manager.pid").read_text())
    deadline = time.monotonic() + 10
    while _alive(server) and time.monotonic() < deadline:
        time.sleep(0.1)
    alive = _alive(server)
    if alive:
        os.kill(server, 9)
    assert not alive, "the Manager server outlived its killed rank"


def reinitialize_and_count_threads(times):
    from anchored_megatron.config import ParallelConfig
    from anchored_megatron.platform import initialize

    counts = []
    for _ in range(times):
        initialize(ParallelConfig(tp=2))
        counts.append(len(os.listdir("/proc/self/task")))
    return counts


@pytest.mark.distributed
def test_a_new_layout_ends_the_previous_layouts_process_groups():
    # Each gloo group runs threads of its own: a process that re-initialises per job (the
    # experiment runner) must not pile them up.
    for counts in run_on_ranks(reinitialize_and_count_threads, 2, 3, threads=1):
        assert counts[0] == counts[1] == counts[2], counts
