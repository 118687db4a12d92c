"""Every rank must see one output directory and the same input checkpoints.

All ranks write checkpoints into output_dir: a node whose output_dir is another directory (a
node-local disk, a filesystem not mounted there) would end up with half of every checkpoint. And a
node that reads another copy of the reference or of the student checkpoint trains another model
without a word. Both are checked once at start-up, before anything is written, collectively: one
all-reduce of a flag, and only when a rank fails the details of every failing rank, so that every
rank raises the same SharedStorageError naming the failing hosts, ranks and paths.
"""

from __future__ import annotations

import os
import secrets
import socket

import torch
import torch.distributed as dist

PROBE_FILE = ".shared_storage_probe"
_SHARD_SUFFIX = ".distcp"  # tensor shards: compared by name only, there can be thousands


class SharedStorageError(RuntimeError):
    """Not every rank sees the same directory."""


def check_output_dir(output_dir: str) -> None:
    """Global rank 0 writes a random token into ``output_dir``; every rank must read it back."""
    rank = dist.get_rank()
    path = os.path.join(output_dir, PROBE_FILE)
    token, problem = None, None
    if rank == 0:
        token = secrets.token_hex(16)
        try:
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(token)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            token, problem = None, f"cannot write {path} ({exc.strerror})"
    box = [(token, os.path.abspath(output_dir))]
    dist.broadcast_object_list(box, src=0)  # sent after the write: every rank reads after it
    sent, rank0_dir = box[0]
    if sent is not None:
        problem = _token_problem(path, sent)
    try:
        _raise_if_any(problem, f"output_dir: every rank must see one directory (all ranks write each checkpoint into "
                               f"it), but not every rank sees global rank 0's {rank0_dir}",
                      "put output_dir on a filesystem that every node mounts at the same path")
    finally:
        if rank == 0 and token is not None:
            os.remove(path)  # every rank has read it: the all-reduce above came after the reads


def check_same_checkpoints(checkpoints: dict[str, str], resolve) -> None:
    """Every rank must see the same checkpoint for each ``{option: path}``: the directory that
    ``resolve(path, option)`` names, at the same real path, with the same entries, and the same size
    and modification time for every file that is not a tensor shard."""
    for option, path in checkpoints.items():
        mine = _checkpoint_identity(path, option, resolve)
        box = [mine if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(box, src=0)
        problem = None if mine == box[0] else _difference(box[0], mine)
        _raise_if_any(problem, f"{option}: every rank must read the same checkpoint, but not every rank sees global rank "
                               f"0's {box[0]['path']}",
                      "put the checkpoint on a filesystem that every node mounts at the same path, or give every "
                      "node an identical copy (same names, sizes and modification times, e.g. rsync -a) at that path")


def _token_problem(path: str, token: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as fh:
            found = fh.read()
    except FileNotFoundError:
        return f"{path} is missing"
    except OSError as exc:
        return f"cannot read {path} ({exc.strerror})"
    return None if found == token else f"{path} holds another token (another directory under the same path)"


def _checkpoint_identity(path: str, option: str, resolve) -> dict:
    try:
        directory = os.path.realpath(resolve(path, option))
        files = {}
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.name.endswith(_SHARD_SUFFIX) or not entry.is_file():
                    files[entry.name] = None
                else:
                    stat = entry.stat()
                    files[entry.name] = (stat.st_size, stat.st_mtime_ns)
        return {"path": directory, "files": dict(sorted(files.items())), "error": None}
    except Exception as exc:  # a rank that cannot resolve it must still take part in the collective
        return {"path": path, "files": {}, "error": f"{type(exc).__name__}: {exc}"}


def _difference(theirs: dict, mine: dict) -> str:
    if mine["error"] is not None:
        return mine["error"]
    if mine["path"] != theirs["path"]:
        return f"it resolves to {mine['path']}"
    names = sorted(set(mine["files"]) ^ set(theirs["files"]))
    if names:
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        return f"its entries differ: {shown}"
    changed = [name for name in mine["files"] if mine["files"][name] != theirs["files"][name]]
    return f"{', '.join(changed)} differ in size or modification time"


def _raise_if_any(problem: str | None, what: str, advice: str) -> None:
    flag = torch.tensor([problem is not None], dtype=torch.int32, device=_collective_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if not flag.item():
        return
    reports = [None] * dist.get_world_size()
    dist.all_gather_object(reports, None if problem is None else (socket.gethostname(), dist.get_rank(), problem))
    ranks_by_failure = {}
    for host, rank, text in filter(None, reports):
        ranks_by_failure.setdefault((host, text), []).append(str(rank))
    failures = "; ".join(f"host {host}, rank{'s' * (len(ranks) > 1)} {', '.join(ranks)}: {text}"
                         for (host, text), ranks in ranks_by_failure.items())
    raise SharedStorageError(f"{what}: {failures}. Fix: {advice}")


def _collective_device() -> torch.device:
    # NCCL reduces CUDA tensors only; gloo takes CPU ones.
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
