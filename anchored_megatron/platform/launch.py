"""Launch a function on N local processes with torchrun's environment, and report every rank.

For work that runs on one machine without torchrun: the forgetting experiment and the demo
(``anchored_megatron.experiment``), the test suite's multi-rank tests and the benchmarks.
Multi-node training goes through torchrun and ``platform.initialize`` instead.

A failure on one rank usually leaves the others blocked in a collective; the launcher then
asks every still-running rank to dump its Python stack (faulthandler on SIGUSR1) before
killing it, so the error report shows where each rank was.
"""

from __future__ import annotations

import faulthandler
import os
import queue as queue_module
import signal
import socket
import tempfile
import time
import traceback


class RankFailure(RuntimeError):
    """One or more ranks raised, died or timed out; the message holds each rank's story."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _as_bytes(value) -> bytes:
    # A tensor put on the queue as it is travels as a file descriptor that the parent fetches
    # from this process, which must still be alive by then; a rank that returns and exits
    # first loses that race. Serialised, the result needs nothing from this process.
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _from_bytes(blob: bytes):
    import io

    import torch

    return torch.load(io.BytesIO(blob), weights_only=False)  # written by our own rank process


def _rank_main(rank, world_size, port, fn, args, kwargs, results, stack_dir, threads, extra_env, launcher_env, launcher_pid):
    # A fork server's child starts with the server's environment, not the launcher's of now.
    os.environ.clear()
    os.environ.update(launcher_env)
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    os.environ.update(extra_env or {})
    stack_file = open(os.path.join(stack_dir, f"rank{rank}.stack"), "w")
    faulthandler.register(signal.SIGUSR1, file=stack_file, all_threads=True)
    from anchored_megatron.platform import supervision, warnings_filter

    warnings_filter.install()
    # A killed launcher (test run, demo) takes its ranks with it; it is not their parent when
    # they fork from the fork server.
    supervision.exit_with_launcher(launcher_pid)
    import torch

    torch.set_num_threads(threads)
    try:
        value = fn(*args, **kwargs)
        results.put((rank, "ok", _as_bytes(value)))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if torch.distributed.is_initialized():  # else there is nothing to end (and no Megatron to import)
            try:
                from anchored_megatron.platform import shutdown

                shutdown()
            except Exception:
                pass


def run_on_ranks(fn, world_size: int, *args, timeout: float = 300.0, threads: int | None = None, env: dict | None = None, **kwargs) -> list:
    """Call ``fn(*args, **kwargs)`` on ``world_size`` fresh processes; return the
    list of each rank's return value, in rank order.

    ``fn``, its arguments and its result must be picklable (``fn`` a module-level function).
    Each process has RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR=127.0.0.1 and a
    free MASTER_PORT set, plus ``env``; ``fn`` calls ``anchored_megatron.platform.initialize``.
    ``threads``: torch threads per rank (default: the CPU cores shared evenly). ``timeout``:
    seconds for the whole launch. Raises RankFailure holding every rank's traceback, or its
    stack dump when it hung, once one rank fails (the others get 10 s) or the time is up.
    """
    ctx = _context()
    results = ctx.Queue()
    port = _free_port()
    threads = threads or max(1, (os.cpu_count() or 1) // world_size)
    with tempfile.TemporaryDirectory(prefix="ranks-") as stack_dir:
        procs = [
            ctx.Process(target=_rank_main, args=(r, world_size, port, fn, args, kwargs, results, stack_dir, threads, env, dict(os.environ),
                                                 os.getpid()), daemon=False)
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        outcomes = _collect(procs, results, timeout)
        _stop(procs, outcomes)
        if all(outcomes.get(r, ("missing",))[0] == "ok" for r in range(world_size)):
            return [_from_bytes(outcomes[r][1]) for r in range(world_size)]
        raise RankFailure(f"{fn.__module__}.{fn.__qualname__} failed on {world_size} ranks:\n" + _report(procs, outcomes, stack_dir))


# Imported once into the fork server; every rank after the first launch starts with them loaded.
PRELOAD = ["anchored_megatron.platform.rank_preload"]


def _context():
    """Ranks fork from a server that imported torch and Megatron-Core once (about 3 s of CPU per
    rank otherwise), yet each starts as clean as a spawned one: no torch thread pool, no
    process group and no CUDA context exist in the server. Where fork is not available: spawn."""
    import multiprocessing

    import torch.multiprocessing as mp

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)  # takes effect when the server starts (first launch)
    return ctx


def _collect(procs, results, timeout: float) -> dict[int, tuple[str, object]]:
    """rank -> (status, value) until every rank reported, 10 s after the first failure, or the timeout."""
    outcomes: dict[int, tuple[str, object]] = {}
    deadline = time.monotonic() + timeout
    failed_at = None
    while len(outcomes) < len(procs):
        now = time.monotonic()
        if now > deadline or (failed_at is not None and now > failed_at + 10.0):
            break
        try:
            rank, status, value = results.get(timeout=0.5)
            outcomes[rank] = (status, value)
            if status == "error" and failed_at is None:
                failed_at = time.monotonic()
        except queue_module.Empty:
            dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in outcomes]
            if dead and failed_at is None:
                # Give the queue a moment: a rank may have put its result just before exiting.
                failed_at = time.monotonic()
    return outcomes


def _stop(procs, outcomes) -> None:
    """Ask every rank without a result for its stack, then end every process."""
    for rank, proc in enumerate(procs):
        if rank not in outcomes and proc.is_alive():
            os.kill(proc.pid, signal.SIGUSR1)
    time.sleep(0.2 if len(outcomes) < len(procs) else 0)
    for proc in procs:
        proc.join(timeout=5)
        if proc.is_alive():
            proc.kill()
            proc.join()


def _report(procs, outcomes, stack_dir: str) -> str:
    """Each rank's outcome: first one line per rank (its exception's last line), because logs
    that keep only the head or the tail of a long report would lose it, then the tracebacks."""
    summary, report = [], []
    for rank, proc in enumerate(procs):
        status, value = outcomes.get(rank, (None, None))
        if status == "ok":
            report.append(f"--- rank {rank}: ok")
        elif status == "error":
            last = next((line for line in reversed(str(value).strip().splitlines()) if line.strip()), "")
            summary.append(f"rank {rank} raised: {last.strip()}")
            report.append(f"--- rank {rank}: raised\n{value}")
        else:
            stack = ""
            path = os.path.join(stack_dir, f"rank{rank}.stack")
            if os.path.exists(path):  # absent when the process died before running the rank
                with open(path) as fh:
                    stack = fh.read().strip()
            why = f"exit code {proc.exitcode}" if proc.exitcode not in (None, -9) else "hung (killed)"
            summary.append(f"rank {rank}: no result, {why}")
            report.append(f"--- rank {rank}: no result, {why}\n{stack or '(no stack dump)'}")
    return "\n".join(summary + report)
