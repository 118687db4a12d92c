"""Run a function on N spawned gloo ranks and surface every rank's outcome.

A failure on one rank usually leaves the others blocked in a collective; the
launcher then asks every still-running rank to dump its Python stack (faulthandler
on SIGUSR1) before killing it, so the error report shows where each rank was.
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


def _rank_main(rank, world_size, port, fn, args, kwargs, results, stack_dir, threads, extra_env):
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    os.environ.update(extra_env or {})
    stack_file = open(os.path.join(stack_dir, f"rank{rank}.stack"), "w")
    faulthandler.register(signal.SIGUSR1, file=stack_file, all_threads=True)
    from anchored_megatron.platform import supervision, warnings_filter

    warnings_filter.install()
    supervision.exit_with_launcher()  # a killed parent (test run, demo) takes its ranks with it
    import torch

    torch.set_num_threads(threads)
    try:
        value = fn(*args, **kwargs)
        results.put((rank, "ok", value))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        try:
            from anchored_megatron.platform import shutdown

            shutdown()
        except Exception:
            pass


def run_on_ranks(fn, world_size: int, *args, timeout: float = 300.0, threads: int | None = None, env: dict | None = None, **kwargs) -> list:
    """Call ``fn(*args, **kwargs)`` on ``world_size`` fresh processes; return each rank's result.

    ``fn`` must be importable (a module-level function). Inside it, torchrun-style
    environment variables are set; call ``anchored_megatron.platform.initialize``.
    Raises RankFailure with every rank's traceback (or stack dump when it hung).
    """
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    threads = threads or max(1, (os.cpu_count() or 1) // world_size)
    stack_dir = tempfile.mkdtemp(prefix="ranks-")
    procs = [
        ctx.Process(target=_rank_main, args=(r, world_size, port, fn, args, kwargs, results, stack_dir, threads, env), daemon=False)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    outcomes: dict[int, tuple[str, object]] = {}
    deadline = time.monotonic() + timeout
    failed_at = None
    while len(outcomes) < world_size:
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
    for rank, proc in enumerate(procs):
        if rank not in outcomes and proc.is_alive():
            os.kill(proc.pid, signal.SIGUSR1)
    time.sleep(0.2 if len(outcomes) < world_size else 0)
    for proc in procs:
        proc.join(timeout=5)
        if proc.is_alive():
            proc.kill()
            proc.join()
    if all(outcomes.get(r, ("missing",))[0] == "ok" for r in range(world_size)):
        return [outcomes[r][1] for r in range(world_size)]
    report = []
    for rank, proc in enumerate(procs):
        status, value = outcomes.get(rank, (None, None))
        if status == "ok":
            report.append(f"--- rank {rank}: ok")
        elif status == "error":
            report.append(f"--- rank {rank}: raised\n{value}")
        else:
            with open(os.path.join(stack_dir, f"rank{rank}.stack")) as fh:
                stack = fh.read().strip()
            why = f"exit code {proc.exitcode}" if proc.exitcode not in (None, -9) else "hung (killed)"
            report.append(f"--- rank {rank}: no result, {why}\n{stack or '(no stack dump)'}")
    raise RankFailure(f"{fn.__module__}.{fn.__qualname__} failed on {world_size} ranks:\n" + "\n".join(report))
