"""Two torchrun agents on one host stand in for two nodes (``--nnodes 2 --nproc_per_node 1``, c10d
rendezvous): tensor and data parallelism across them train as on one node; a SIGKILLed worker is
restarted by the agents (``--max-restarts 1``) and the run resumes from ``latest`` to the losses of
an uninterrupted run, also under pipeline parallelism; a node that sees another output_dir is
refused by name before anything is written; a rank that stops answering ends the others within
``train.collective_timeout_minutes`` with one line naming the step and phase."""

import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from tests.training.cli import ROOT, cli_env, write_config
from tests.training.conftest import read_metrics, run_config, tiny_run  # noqa: F401  (tiny_run: the fixture)

pytestmark = pytest.mark.distributed

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
STEPS = 4
LAUNCH_TIMEOUT = 300
LAYOUTS = {"tp": {"parallel__tp": 2}, "dp": {}, "pp": {"parallel__pp": 2}}  # on two ranks


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Launch:
    """torchrun agents, each its own subprocess and session, with their output in files."""

    def __init__(self, root, name, commands):
        self.logs = [root / f"{name}.agent{i}.log" for i in range(len(commands))]
        self.agents = []
        for command, log in zip(commands, self.logs):
            with open(log, "w") as out:
                # One thread per worker, as torchrun sets when it starts several on a node: two workers of
                # one host would otherwise contend for its cores.
                self.agents.append(subprocess.Popen(command, cwd=ROOT, env=cli_env(OMP_NUM_THREADS="1"), stdout=out,
                                                    stderr=subprocess.STDOUT, start_new_session=True))

    def output(self):
        return "\n".join(f"--- {log.name}\n{log.read_text()}" for log in self.logs)

    def wait(self, timeout=LAUNCH_TIMEOUT):
        deadline = time.monotonic() + timeout
        try:
            return [agent.wait(timeout=max(deadline - time.monotonic(), 1)) for agent in self.agents]
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the launch did not end within {timeout} s\n{self.output()}")

    def kill(self):
        for agent in self.agents:
            if agent.poll() is None:
                os.killpg(agent.pid, signal.SIGKILL)  # the agent's session: the agent and its workers
                agent.wait()

    def workers(self, agent=0):
        """The training processes an agent runs now, as {RANK: psutil.Process}."""
        found = {}
        for child in psutil.Process(self.agents[agent].pid).children():
            try:
                if "anchored_megatron.train" in child.cmdline():
                    found[int(child.environ()["RANK"])] = child
            except (psutil.NoSuchProcess, KeyError):
                pass
        return found


def two_agents(root, name, config, *overrides, max_restarts=0, per_agent=((), ())):
    endpoint = f"127.0.0.1:{_free_port()}"
    return Launch(root, name, [
        [*TORCHRUN, "--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
         "--max-restarts", str(max_restarts), "-m", "anchored_megatron.train", "--config", config, *overrides, *extra]
        for extra in per_agent
    ])


def one_agent(root, name, config, *overrides, nproc=2, max_restarts=0):
    return Launch(root, name, [[*TORCHRUN, "--standalone", "--nproc_per_node", str(nproc), "--max-restarts", str(max_restarts),
                                "-m", "anchored_megatron.train", "--config", config, *overrides]])


def losses(output_dir):
    """Per step, the loss of the last record: a restarted attempt logs again the steps since the checkpoint."""
    return {record["step"]: record["loss"] for record in read_metrics(output_dir)}


def assert_same_losses(got, expected):
    assert sorted(got) == list(range(1, STEPS + 1)) and sorted(expected) == sorted(got), (got, expected)
    worst = max(abs(got[step] - expected[step]) for step in got)
    assert worst <= 1e-6, (worst, got, expected)


def wait_for(condition, timeout, what, launch):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline or all(agent.poll() is not None for agent in launch.agents):
            launch.kill()
            pytest.fail(f"timed out waiting for {what}\n{launch.output()}")
        time.sleep(0.05)


def tiny_config(tiny_run, output_dir, **overrides):
    # The anchor on the live student: the reference is the one frozen role (no snapshot saves).
    return run_config(tiny_run, output_dir, **{"train__max_steps": STEPS, "anchor__source": "live", **overrides})


def train_rank(cfg_dict):
    from anchored_megatron.config import RunConfig, build
    from anchored_megatron.training.trainer import train

    train(build(RunConfig, cfg_dict))


@pytest.fixture(scope="module")
def configs(tiny_run, tmp_path_factory):
    """``configs(name, **overrides)``: a tiny run's config file and output_dir."""
    root = tmp_path_factory.mktemp("multinode")

    def make(name, **overrides):
        out = root / name
        return write_config(root / f"{name}.yaml", tiny_config(tiny_run, out, **overrides)), str(out), root
    return make


@pytest.fixture(scope="module")
def single_node(tiny_run, ranks, tmp_path_factory):
    """Uninterrupted runs on one node, 2 ranks each (the project's local launcher, whose rank
    processes start with the imports done), one per layout and only once: {layout: losses}."""
    root, results = tmp_path_factory.mktemp("single_node"), {}

    def run(layout):
        if layout not in results:
            ranks(train_rank, 2, tiny_config(tiny_run, root / layout, **LAYOUTS[layout]))
            results[layout] = losses(root / layout)
        return results[layout]
    return run


def test_tensor_parallel_across_two_nodes_trains_as_on_one(configs, single_node):
    config, out, root = configs("two_nodes_tp", parallel__tp=2)
    launch = two_agents(root, "two_nodes_tp", config)
    assert launch.wait() == [0, 0], launch.output()
    assert_same_losses(losses(out), single_node("tp"))


def test_data_parallel_across_two_nodes_trains_as_on_one(configs, single_node):
    config, out, root = configs("two_nodes_dp")
    launch = two_agents(root, "two_nodes_dp", config)
    assert launch.wait() == [0, 0], launch.output()
    assert_same_losses(losses(out), single_node("dp"))


def _kill_a_worker_after_the_first_checkpoint(launch, out, agent):
    latest = os.path.join(out, "checkpoints", "latest")
    wait_for(lambda: os.path.exists(latest), LAUNCH_TIMEOUT, "the first checkpoint", launch)
    workers = launch.workers(agent)
    assert workers, launch.output()
    victim = max(workers.values(), key=lambda worker: int(worker.environ()["RANK"]))
    victim.send_signal(signal.SIGKILL)


def test_a_killed_worker_on_one_node_is_restarted_and_the_run_resumes_to_the_same_losses(configs, single_node):
    config, out, root = configs("two_nodes_restart", parallel__tp=2, train__save_interval=1)
    launch = two_agents(root, "two_nodes_restart", config, max_restarts=1)
    _kill_a_worker_after_the_first_checkpoint(launch, out, agent=1)
    assert launch.wait() == [0, 0], launch.output()
    assert "resumed from" in (root / "two_nodes_restart" / "train.log").read_text(), launch.output()
    assert_same_losses(losses(out), single_node("tp"))


def test_under_pipeline_parallelism_a_killed_worker_is_restarted_and_resumes(configs, single_node):
    config, out, root = configs("pp_restart", parallel__pp=2, train__save_interval=1)
    launch = one_agent(root, "pp_restart", config, max_restarts=1)
    _kill_a_worker_after_the_first_checkpoint(launch, out, agent=0)
    assert launch.wait() == [0], launch.output()
    assert "resumed from" in (root / "pp_restart" / "train.log").read_text(), launch.output()
    assert_same_losses(losses(out), single_node("pp"))


def test_a_node_that_sees_another_output_dir_is_named_and_nothing_is_written(configs):
    config, out, root = configs("storage", parallel__tp=2)
    other = root / "storage_elsewhere"
    launch = two_agents(root, "storage", config, per_agent=((), (f"output_dir={other}",)))
    assert launch.wait() == [1, 1], launch.output()
    output = launch.output()
    line = next((line for line in output.splitlines() if "anchored-sft: error: output_dir:" in line), None)
    assert line is not None, output
    assert "every rank must see one directory" in line and f"host {socket.gethostname()}, rank 1: " in line, line
    assert f"{os.path.join(out, '.shared_storage_probe')} is missing" in line or \
        f"{os.path.join(other, '.shared_storage_probe')} is missing" in line, line
    for directory in (out, other):
        assert not os.path.exists(os.path.join(directory, "checkpoints")), os.listdir(directory)
        assert not os.path.exists(os.path.join(directory, "snapshots")), os.listdir(directory)


def _storage_verdicts(output_dirs, checkpoints):
    """On each rank: the SharedStorageError message (None when it passes) of each check, in turn."""
    import torch.distributed as dist

    from anchored_megatron.platform import shared_storage

    dist.init_process_group("gloo")
    rank, verdicts = dist.get_rank(), []
    for output_dir, checkpoint in zip(output_dirs[rank], checkpoints[rank]):
        for check in (lambda: shared_storage.check_output_dir(output_dir),
                      lambda: shared_storage.check_same_checkpoints({"reference.checkpoint": checkpoint}, lambda path, option: path)):
            try:
                check()
                verdicts.append(None)
            except shared_storage.SharedStorageError as exc:
                verdicts.append(str(exc))
    return verdicts


def test_every_rank_names_the_ranks_that_see_another_directory_or_checkpoint(ranks, tmp_path):
    import shutil

    shared, elsewhere = tmp_path / "shared", tmp_path / "elsewhere"
    shared.mkdir(), elsewhere.mkdir()
    checkpoint = tmp_path / "reference"
    checkpoint.mkdir()
    (checkpoint / "metadata.json").write_text("{}")
    (checkpoint / "__0_0.distcp").write_bytes(b"x")
    copy = shutil.copytree(checkpoint, tmp_path / "reference_copy")  # same names, sizes and times, another path
    # Case 1: one directory and one checkpoint for both ranks. Case 2: rank 1 sees others.
    verdicts = ranks(_storage_verdicts, 2, [[str(shared), str(shared)], [str(shared), str(elsewhere)]],
                     [[str(checkpoint), str(checkpoint)], [str(checkpoint), str(copy)]])
    assert verdicts[0] == verdicts[1], verdicts
    same_dir, same_checkpoint, other_dir, other_checkpoint = verdicts[0]
    assert same_dir is None and same_checkpoint is None, verdicts
    host = socket.gethostname()
    assert other_dir == (f"output_dir: every rank must see one directory (all ranks write each checkpoint into it), but not every rank "
                         f"sees global rank 0's {shared}: host {host}, rank 1: {elsewhere / '.shared_storage_probe'} is missing. Fix: put output_dir "
                         "on a filesystem that every node mounts at the same path"), other_dir
    assert other_checkpoint.startswith(f"reference.checkpoint: every rank must read the same checkpoint, but not every rank sees "
                                       f"global rank 0's {checkpoint}: host {host}, rank 1: it resolves to {copy}. Fix: "), other_checkpoint
    assert os.listdir(shared) == [], "the probe file is removed after the check"


def test_a_checkpoint_copy_with_another_file_time_or_entry_is_told_apart(tmp_path):
    from anchored_megatron.platform.shared_storage import _checkpoint_identity, _difference

    (tmp_path / "metadata.json").write_text("{}")
    (tmp_path / "__0_0.distcp").write_bytes(b"x")
    original = _checkpoint_identity(str(tmp_path), "reference.checkpoint", lambda path, option: path)
    os.utime(tmp_path / "metadata.json", ns=(1, 1))
    assert _difference(original, _checkpoint_identity(str(tmp_path), "x", lambda path, option: path)) == \
        "metadata.json differ in size or modification time"
    (tmp_path / "__1_0.distcp").write_bytes(b"x")
    assert _difference(original, _checkpoint_identity(str(tmp_path), "x", lambda path, option: path)) == "its entries differ: __1_0.distcp"
    missing = _checkpoint_identity(str(tmp_path / "nowhere"), "x", lambda path, option: path)
    assert _difference(original, missing).startswith("FileNotFoundError: ")


def test_a_rank_that_stops_answering_ends_the_others_within_the_timeout_and_the_run_resumes(configs):
    minutes, steps = 0.25, 6  # steps: rank 1 is stopped after the first checkpoint, well before the end
    config, out, root = configs("hung", parallel__tp=2, train__save_interval=1, train__max_steps=steps,
                                train__collective_timeout_minutes=minutes)
    launch = one_agent(root, "hung", config)
    wait_for(lambda: os.path.exists(os.path.join(out, "checkpoints", "latest")), LAUNCH_TIMEOUT, "the first checkpoint", launch)
    workers = launch.workers()
    workers[1].send_signal(signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        psutil.wait_procs([workers[0]], timeout=minutes * 60 + 60)
        waited = time.monotonic() - stopped
        assert not workers[0].is_running(), f"rank 0 still runs {waited:.0f} s after rank 1 stopped\n{launch.output()}"
    finally:
        workers[1].send_signal(signal.SIGKILL)
    launch.wait()
    lines = [line for line in launch.output().splitlines() if "a collective did not complete" in line]
    assert len(lines) == 1, launch.output()
    assert lines[0].startswith("anchored-sft: step ") and \
        f"within train.collective_timeout_minutes={minutes:g} (in " in lines[0] and lines[0].endswith("; the run stops; resume from latest"), lines
    assert waited < minutes * 60 + 45, waited

    again = one_agent(root, "hung_resumed", config)
    assert again.wait() == [0], again.output()
    assert "resumed from" in again.output()
    assert max(losses(out)) == steps
