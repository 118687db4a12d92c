"""A rank ends when the launcher that started it is gone.

torchrun's agent passes SIGTERM / SIGINT on to its workers, but when the agent itself is killed
outright (SIGKILL, the OOM killer, a scheduler's hard stop) the workers are re-parented and
train on: they keep the accelerators, keep writing checkpoints and metrics, and race the next
launch into the same output directory. ``exit_with_launcher`` makes a rank end within about a
second of its launcher.

How: a daemon thread polls ``os.getppid()`` and ends the process when the parent changes (the
orphan has been re-parented to init or a subreaper). Chosen over Linux's
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


def _watch(parent: int, rank: str) -> None:
    while os.getppid() == parent:
        time.sleep(POLL_SECONDS)
    try:
        print(f"rank {rank}: the launcher (pid {parent}) is gone; exiting", file=sys.stderr, flush=True)
    finally:
        # Not sys.exit: this is not the main thread, and the main one may be inside a collective
        # that waits forever for ranks that are gone. Checkpoints are published atomically, so
        # stopping at any point leaves the previous one intact.
        os._exit(EXIT_CODE)


def exit_with_launcher(parent: int | None = None) -> bool:
    """Start the watchdog when this process is a launched rank; returns whether it runs. Idempotent.

    ``parent``: the launcher's pid as read first thing at start-up (default: now); a launcher
    that dies between that read and this call is noticed at the first poll.
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
