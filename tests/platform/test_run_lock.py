"""One run per output directory: a second holder is refused with the first one's name; a lock
whose holder died does not stand in the way."""

import os
import signal
import socket
import subprocess
import sys

import pytest

from anchored_megatron.platform.run_lock import OutputDirInUse, RunLock, hold_output_dir

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_second_holder_is_refused_with_the_directory_and_the_holder(tmp_path):
    first = RunLock(str(tmp_path))
    assert first.acquire() is None
    try:
        refusal = RunLock(str(tmp_path)).acquire()
        assert refusal.startswith(f"output_dir: {tmp_path} is in use by another run (pid {os.getpid()} on {socket.gethostname()}, started ")
        assert refusal.endswith(f"(lock file {tmp_path / 'run.lock'})")
    finally:
        first.release()
    again = RunLock(str(tmp_path))
    assert again.acquire() is None
    again.release()


def test_lock_of_a_killed_holder_is_taken_over(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from anchored_megatron.platform.run_lock import RunLock; "
         "assert RunLock(sys.argv[1]).acquire() is None; print('locked', flush=True); time.sleep(600)", str(tmp_path)],
        stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=ROOT),
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert "in use by another run" in RunLock(str(tmp_path)).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = RunLock(str(tmp_path))
    assert lock.acquire() is None
    lock.release()


def locked_rank(output_dir):
    from anchored_megatron.config import ParallelConfig
    from anchored_megatron.platform import initialize

    initialize(ParallelConfig(), seed=0)
    try:
        hold_output_dir(output_dir)
    except OutputDirInUse as exc:
        return str(exc)
    return None


@pytest.mark.distributed
def test_every_rank_refuses_a_directory_held_by_another_run(tmp_path, ranks):
    held = RunLock(str(tmp_path))
    assert held.acquire() is None
    try:
        messages = ranks(locked_rank, 2, str(tmp_path))
    finally:
        held.release()
    assert messages[0] is not None and f"pid {os.getpid()}" in messages[0]
    assert messages == [messages[0]] * 2
