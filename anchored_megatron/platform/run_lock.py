"""One run per output directory: global rank 0 holds an exclusive lock on ``output_dir/run.lock``.

The lock is ``flock(2)``: it belongs to the open file and the kernel drops it when the holding
process ends, however it ends (SIGKILL and OOM kills included). A lock file left behind by a
dead run is therefore never in the way; it is locked again and its contents replaced. The file
names the holder (host, pid, start time) so that a refused launch can say who holds it.

Shared filesystems (multi-node runs keep output_dir on one): a Linux NFS client turns flock into
NFS byte-range locks, which hold across hosts (NFSv4; NFSv3 with the lock manager running); if
the holder's host dies, the server frees the lock when the client's lease ends (about 90 s on
NFSv4). Lustre holds flock across clients only when mounted with ``-o flock``; with
``localflock`` the lock guards one node only, and without either option flock fails: the run
then says in one line that output_dir is not guarded, and goes on.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import sys

LOCK_FILE = "run.lock"


class OutputDirInUse(RuntimeError):
    """Another live run holds the output directory."""


class RunLock:
    """The lock of one output directory, held from ``acquire`` until ``release`` or process exit."""

    def __init__(self, output_dir: str):
        self.output_dir = output_dir
        self.path = os.path.join(output_dir, LOCK_FILE)
        self._fd = None

    def acquire(self) -> str | None:
        """Take the lock; None on success, else the refusal message naming the holder."""
        os.makedirs(self.output_dir, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(os.read(fd, 4096))
            os.close(fd)
            return (
                f"output_dir: {os.path.abspath(self.output_dir)} is in use by another run ({holder}); "
                f"wait for it to end or stop it, or choose another output_dir (lock file {self.path})"
            )
        except OSError as exc:  # the filesystem has no flock (e.g. Lustre without -o flock)
            os.close(fd)
            print(f"output_dir: {self.path}: cannot lock ({exc.strerror}); nothing stops a second run "
                  "from writing into this directory at the same time", file=sys.stderr, flush=True)
            return None
        holder = {"host": socket.gethostname(), "pid": os.getpid(),
                  "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self._fd = fd
        return None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None


def _describe(content: bytes) -> str:
    try:
        holder = json.loads(content)
        return f"pid {holder['pid']} on {holder['host']}, started {holder['started']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"


def hold_output_dir(output_dir: str) -> RunLock | None:
    """Global rank 0 locks ``output_dir``; every rank raises OutputDirInUse when another run holds
    it. Call on every rank once the process group exists. Returns rank 0's lock (None elsewhere)."""
    import torch.distributed as dist

    distributed = dist.is_initialized() and dist.get_world_size() > 1
    lock, refusal = None, None
    if not distributed or dist.get_rank() == 0:
        lock = RunLock(output_dir)
        refusal = lock.acquire()
    if distributed:
        verdict = [refusal]
        dist.broadcast_object_list(verdict, src=0)
        refusal = verdict[0]
    if refusal is not None:
        raise OutputDirInUse(refusal)
    return lock
