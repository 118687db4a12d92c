"""A rank ends with its launcher; one run per output directory, and the lock of a killed run
stands in nobody's way. The rank is ``python -m anchored_megatron.train`` under a stand-in
launcher (sets the launcher's environment, starts the rank, waits) that the test SIGKILLs."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.training.cli import ROOT, TRAIN, cli_env, run_train, write_config
from tests.training.conftest import run_config

LAUNCHER = """
import subprocess, sys, time
with open(sys.argv[1], "w") as out, open(sys.argv[2], "w") as err:
    rank = subprocess.Popen(sys.argv[3:], stdout=out, stderr=err)
print(rank.pid, flush=True)
time.sleep(3600)
"""


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _alive(pid):
    """Running, as opposed to exited (a zombie nobody reaped counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait_for(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def killed_launcher(tiny_run, tmp_path_factory):
    """A long sft run under the stand-in launcher; once it trains, a second launch into its
    output_dir; then the launcher is SIGKILLed; then a short run into the same output_dir."""
    root = tmp_path_factory.mktemp("crash")
    out = root / "run"
    cfg = run_config(tiny_run, out, anchor__objective="sft", anchor__outer_iterations=50)  # 400 steps: still running when killed
    del cfg["anchor"]["alpha"], cfg["reference"]
    config = write_config(root / "run.yaml", cfg)
    env = cli_env(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(root / "rank.out"), str(root / "rank.err"), *TRAIN,
                                 "--config", config], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    try:
        rank = int(launcher.stdout.readline())
        metrics = out / "metrics.jsonl"
        _wait_for(lambda: metrics.exists() and metrics.read_text().count("\n") >= 1 or not _alive(rank), 600, "the first step")
        assert _alive(rank), (root / "rank.err").read_text()
        second = run_train(config)
        assert _alive(rank), "the running rank must outlive the refused launch"
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        killed_at = time.monotonic()
        _wait_for(lambda: not _alive(rank), 60, "the rank to exit")
        exit_seconds = time.monotonic() - killed_at
    finally:
        launcher.kill()
        launcher.wait()
    steps_at_kill = metrics.read_text().count("\n")
    after = run_train(config, f"train.max_steps={steps_at_kill + 2}")
    return {"out": str(out), "launcher": launcher.pid, "rank": rank, "exit_seconds": exit_seconds, "second": second,
            "rank_stderr": (root / "rank.err").read_text(),
            "steps_at_kill": steps_at_kill, "after": after}


def test_rank_exits_within_seconds_of_its_launchers_death(killed_launcher):
    assert killed_launcher["exit_seconds"] < 10, killed_launcher["exit_seconds"]
    assert f"rank 0: the launcher (pid {killed_launcher['launcher']}) is gone; exiting" in killed_launcher["rank_stderr"]
    assert killed_launcher["steps_at_kill"] < 400  # it stopped mid-run


def test_second_launch_into_a_running_output_dir_is_refused_on_sight(killed_launcher):
    second, out = killed_launcher["second"], killed_launcher["out"]
    assert second.returncode == 2
    assert second.stderr.startswith(f"anchored-sft: error: output_dir: {out} is in use by another run "
                                    f"(pid {killed_launcher['rank']} on {socket.gethostname()}, started "), second.stderr
    assert second.stderr.rstrip().endswith(f"choose another output_dir (lock file {out}/run.lock)")
    assert second.stdout == ""


def test_lock_of_a_killed_run_does_not_block_the_next(killed_launcher):
    after = killed_launcher["after"]
    assert after.returncode == 0, after.stderr
    last = killed_launcher["steps_at_kill"] + 2
    assert after.stdout.splitlines()[-1].startswith(f"stopped at step {last}/400 (train.max_steps): ")
    with open(os.path.join(killed_launcher["out"], "metrics.jsonl")) as fh:
        assert [json.loads(line)["step"] for line in fh] == list(range(1, last + 1))
