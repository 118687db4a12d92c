"""The async checkpoint writer's Manager server ends with the rank that started it.

Megatron's ``FileSystemWriterAsync`` collects write results through a queue served by a
``multiprocessing`` Manager: a separate ~270 MB Python process, started on the first save and
kept for the life of the rank. A rank that ends normally or by an exception shuts it down; a rank
that is killed (SIGKILL from a launcher ending the survivors of a failed launch, the OOM killer, a
scheduler's hard stop) leaves it running, re-parented to init, for good. Measured here: a launch
whose rank 1 failed left rank 0's server alive after its launcher had killed rank 0.

The queue is made here instead, by a Manager whose server asks Linux for SIGKILL when the rank
that started it dies (``PR_SET_PDEATHSIG``). Same queue type, same start method; elsewhere than
Linux the server is Megatron's as before. The module-level queue getter is replaced, which is
where both releases' writers fetch it: ``_get_write_results_queue()`` up to 0.18,
``get_write_results_queue(mp_mode)`` from 0.19.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
from multiprocessing.managers import SyncManager

_GETTERS = ("_get_write_results_queue", "get_write_results_queue")
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent: int) -> None:
    """The Manager server's initializer: SIGKILL when ``parent`` (the rank) is gone, including
    when it went before the request was made."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


def _queue_getter(module, original, takes_mode: bool):
    def get_write_results_queue(mp_mode: str = "spawn"):
        # Linux sends the signal when the *thread* that started the server ends: only the main
        # thread lives as long as the rank.
        if module._results_queue is None and threading.current_thread() is threading.main_thread():
            manager = SyncManager(ctx=multiprocessing.get_context(mp_mode))
            manager.start(die_with_parent, (os.getpid(),))
            module._results_queue = manager.Queue()
        return original(mp_mode) if takes_mode else original()

    get_write_results_queue.anchored_megatron_patch = True
    return get_write_results_queue


def apply() -> bool:
    """Replace the writer's queue getter (Linux only); returns whether it is installed."""
    if not sys.platform.startswith("linux"):
        return False
    from megatron.core.dist_checkpointing.strategies import filesystem_async as module

    for name in _GETTERS:
        original = getattr(module, name, None)
        if original is None or not hasattr(module, "_results_queue"):
            continue
        if not getattr(original, "anchored_megatron_patch", False):
            setattr(module, name, _queue_getter(module, original, takes_mode=name == "get_write_results_queue"))
        return True
    return False
