"""A rank ends when the launcher that started it is gone.

torchrun's agent passes SIGTERM / SIGINT on to its workers, but when the agent itself is killed
outright (SIGKILL, the OOM killer, a scheduler's hard stop) the workers are re-parented and
train on: they keep the accelerators, keep writing checkpoints and metrics, and race the next
launch into the same output directory. ``exit_with_launcher`` makes a rank end within about a
second of its launcher.

How: a daemon thread polls once a second and ends the process when its parent changes (the
orphan has been re-parented to init or a subreaper) or the launcher is gone. The two differ for
ranks forked from a fork server (``run_on_ranks``): their parent is the server, which outlives a
killed launcher, so the launcher itself is watched, by pid and (on Linux) by its start time, so
that a recycled pid does not pass for it. Chosen over Linux's
``prctl(PR_SET_PDEATHSIG)`` because the kernel sends that signal when the *thread* that forked
the child exits, not the process: a launcher that starts ranks from a helper thread would have
healthy ranks killed when that thread ends. The thread is portable, costs one wake-up a second,
and needs the interpreter to run Python now and then (torch ops release the GIL; a rank stuck
in native code that holds it would not notice).

Only processes started as a rank are supervised (``LOCAL_RANK`` set, as torchrun and
``anchored_megatron.platform.run_on_ranks`` do): a single process run from a shell keeps running
under ``nohup`` after the shell exits. A launcher that died before this is called (during the
interpreter's start-up, well under a second) is not noticed.
"""

from __future__ import annotations

import os
import sys
import threading
import time

POLL_SECONDS = 1.0
EXIT_CODE = 1

_started = False


def _start_time(pid: int) -> bytes | None:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22), or None
    where there is no /proc or no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            # The command name (field 2) may hold spaces and parentheses: count from its last ")".
            return fh.read().rsplit(b")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _exists(pid: int, started: bytes | None) -> bool:
    if started is not None:
        return _start_time(pid) == started
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _end_children() -> None:
    """os._exit skips the finalizers that stop this process's multiprocessing children, e.g. the
    Manager server Megatron's async checkpoint writer starts: without this it would live on."""
    import multiprocessing

    for child in multiprocessing.active_children():
        child.kill()


def _watch(launcher: int, rank: str) -> None:
    parent, started = os.getppid(), _start_time(launcher)
    while os.getppid() == parent and _exists(launcher, started):
        time.sleep(POLL_SECONDS)
    try:
        print(f"rank {rank}: the launcher (pid {launcher}) is gone; exiting", file=sys.stderr, flush=True)
        _end_children()
    finally:
        # Not sys.exit: this is not the main thread, and the main one may be inside a collective
        # that waits forever for ranks that are gone. Checkpoints are published atomically, so
        # stopping at any point leaves the previous one intact.
        os._exit(EXIT_CODE)


def exit_with_launcher(parent: int | None = None) -> bool:
    """Start the watchdog when this process is a launched rank; returns whether it runs. Idempotent.

    ``parent``: the launcher's pid, as read first thing at start-up or handed over by the
    launcher (default: this process's parent now); a launcher that dies between that read and
    this call is noticed at the first poll.
    """
    global _started
    if _started:
        return True
    if "LOCAL_RANK" not in os.environ:
        return False
    parent = os.getppid() if parent is None else parent
    threading.Thread(target=_watch, args=(parent, os.environ.get("RANK", "?")), name="exit-with-launcher", daemon=True).start()
    _started = True
    return True
