"""Files a reader never sees half-written: the text goes to a temporary file beside the target,
is flushed to disk, and replaces the target in one rename (the directory entry is flushed too,
so a crash right after leaves either the old or the new file)."""

from __future__ import annotations

import os


def write_atomically(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path))


def fsync_dir(path: str) -> None:
    """Flush a directory's entries (a rename into it survives a crash)."""
    fd = os.open(path or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
