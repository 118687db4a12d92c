"""Checkpoints with dist_checkpointing (torch_dist): reshardable across TP/PP/DP.

Layout of ``<root>``::

    iter_0000120/        one complete checkpoint (model, optimizer, trainer state,
                         rank_state/rank_NNNNN.pt, manifest.json; eval.json when the
                         step was evaluated, see ``best``)
    iter_0000120.tmp/    a save in progress; never read
    latest               text file naming the newest complete checkpoint

A trainer keeps this root at ``<output_dir>/checkpoints``. Every tool that takes a
checkpoint path (the trainer's ``student.checkpoint``, ``anchored-convert --ckpt``) reads
it through ``dirs.resolve_checkpoint_dir``.

A save writes into ``iter_N.tmp``, all ranks meet at a barrier, the ranks checksum the
files into ``manifest.json`` (each rank the files it wrote), then rank 0 renames the
folder and replaces ``latest`` atomically (write + fsync + rename). A process killed
mid-save therefore leaves the previous checkpoint and its ``latest`` pointer untouched.

A load first verifies the directory against its manifest (``verify_checkpoint``): rank 0
compares the listing and sizes, every rank checksums about an equal share of the bytes.
Any failure, there or while reading, is a ``CheckpointError`` naming the checkpoint, the
file, and the command that points ``latest`` back at the previous checkpoint.
"""

from __future__ import annotations

import os
import shutil
import sys

import torch

from anchored_megatron.checkpoint import install, manifest
from anchored_megatron.checkpoint.dirs import (
    LATEST, RUN_CHECKPOINTS, checkpoint_name, iterations, latest_checkpoint, latest_name, repoint_advice,
)
from anchored_megatron.checkpoint.errors import CheckpointError
from anchored_megatron.checkpoint.mcore_format import take_writer_errors
from anchored_megatron.models.layout import unwrap
from anchored_megatron.platform import collective_timeout
from anchored_megatron.platform.files import fsync_dir, write_atomically

# Only the distributed optimizer's fully reshardable format survives a change of TP/PP/DP.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}
COMMON_STATE = "common.pt"  # Megatron's name for the state every rank shares
# Kept in common.pt: tells a checkpoint whose manifest was deleted from one written before manifests.
MANIFEST_MARKER = "manifest_format"


def model_keys(num_chunks: int) -> list[str]:
    """Megatron-LM's names: "model" for one chunk, "model0", "model1", ... for virtual-pipeline chunks."""
    return ["model"] if num_chunks == 1 else [f"model{i}" for i in range(num_chunks)]


def model_sharded_state_dict(chunks) -> dict:
    return {key: unwrap(chunk).sharded_state_dict() for key, chunk in zip(model_keys(len(chunks)), chunks)}


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def _from_rank0(obj):
    """Rank 0's ``obj`` on every rank."""
    if not torch.distributed.is_initialized():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _from_all(obj) -> list:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not torch.distributed.is_initialized():
        return [obj]
    gathered = [None] * _world_size()
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


RANK_STATE_DIR = "rank_state"


def _rank_state_path(directory: str, rank: int) -> str:
    return os.path.join(directory, RANK_STATE_DIR, f"rank_{rank:05d}.pt")


# ---- errors that say what to do ---------------------------------------------------------------
def _failure(path: str, problems: list[str], advice: str | None) -> CheckpointError:
    if len(problems) == 1:
        lines = [f"checkpoint {path}: {problems[0]}"]
    else:
        lines = [f"checkpoint {path}: {len(problems)} problems:"] + [f"  {p}" for p in problems[:10]]
        if len(problems) > 10:
            lines.append(f"  ... and {len(problems) - 10} more")
    lines.append(advice or repoint_advice(path))
    return CheckpointError("\n".join(lines))


def read_checkpoint_files(path: str, what: str, read, advice: str | None):
    """``read()``, with any failure reported as a CheckpointError naming ``what``."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        return read()
    # torch.distributed.checkpoint reports a failed read as a BaseException holding each rank's error.
    except (Exception, CheckpointException) as exc:  # noqa: BLE001 - every read failure is reported with the checkpoint and file
        raise _failure(path, [f"{what}: cannot be read ({_cause(exc)})"], advice) from exc


def _cause(exc: BaseException) -> str:
    from torch.distributed.checkpoint.api import CheckpointException

    where = ""
    if isinstance(exc, CheckpointException) and exc.failures:
        rank, (exc, _) = next(iter(sorted(exc.failures.items(), key=lambda item: item[0])))
        where = f"rank {rank}: "
    text = str(exc).strip()
    return f"{where}{type(exc).__name__}" + (f": {text.splitlines()[0]}" if text else "")


# ---- the manifest: written collectively before publication, verified collectively on load ----
def write_manifest(directory: str) -> None:
    """Collective: each rank checksums the files it wrote; rank 0 writes ``manifest.json``.
    Call it last, once every file of the checkpoint is in ``directory``."""
    names = _from_rank0(manifest.list_files(directory) if _rank() == 0 else None)
    world, rank = _world_size(), _rank()
    entries = manifest.hash_entries(directory, [n for n in names if manifest.writer_rank(n, world) == rank])
    parts = _from_all(entries)
    if rank == 0:
        manifest.write_manifest(directory, {name: entry for part in parts for name, entry in part.items()})


def checkpoint_problems(path: str, checksums: bool = True) -> list[str] | None:
    """What differs between ``path`` and its manifest: listing and sizes always, checksums
    unless switched off; None for a checkpoint without a manifest (written before manifests).

    Collective when a process group exists: rank 0 lists the directory, every rank hashes
    about 1/world of the bytes, and every rank returns the same answer.
    """
    head = None
    if _rank() == 0:
        head = (["no such checkpoint directory"], {})
        if os.path.isdir(path):
            try:
                files = manifest.read_manifest(path)
                if files is not None:
                    head = (manifest.listing_problems(path, files), files)
                elif _saved_with_manifest(path):
                    head = ([f"{manifest.MANIFEST}: missing (the save wrote one)"], {})
                else:
                    head = ([], None)
            except CheckpointError as exc:
                head = ([str(exc)], {})
    problems, files = _from_rank0(head)
    if files is None:
        return None
    if checksums and not problems:
        share = manifest.balanced_shares(files, _world_size())[_rank()]
        problems = sorted(p for part in _from_all(manifest.checksum_problems(path, files, share)) for p in part)
    return problems


def _saved_with_manifest(path: str) -> bool:
    from megatron.core import dist_checkpointing

    install()
    try:  # common.pt up to megatron-core 0.18, inside the torch_dist files from 0.19
        common = dist_checkpointing.load_common_state_dict(path)
    except Exception:  # noqa: BLE001 - an unreadable common state is reported by the load, naming it
        return False
    return isinstance(common, dict) and MANIFEST_MARKER in common


def verify_checkpoint(path: str, checksums: bool = True, advice: str | None = None) -> bool:
    """Raise CheckpointError naming every file that differs from the manifest (see
    ``checkpoint_problems``); return False when there is no manifest to verify against."""
    problems = checkpoint_problems(path, checksums)
    if problems:
        raise _failure(path, problems, advice)
    return problems is not None


def check_before_load(path: str, checksums: bool = True, advice: str | None = None) -> bool:
    """What every load does before it reads a byte: install the safe loading, refuse an unsafe
    torch.load setting and a format this Megatron-Core cannot read, then ``verify_checkpoint``
    (whose answer it returns)."""
    from anchored_megatron.checkpoint import mcore_format, safe_load

    install()
    safe_load.refuse_unsafe_torch_load(path)
    mcore_format.check_readable(path)
    return verify_checkpoint(path, checksums, advice)


# Below this much free space a failed save is put down to a full disk whatever the error says:
# torch's own writer (common.pt, a rank's state) reports a short write as "unexpected pos N vs M",
# with no errno to tell.
NEARLY_FULL_BYTES = 16 * 2**20


def _free_bytes(path: str) -> int | None:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def _disk_full(exc: BaseException, free_bytes: int | None = None) -> bool:
    """Whether a full disk is behind ``exc``: ENOSPC in it, in torch.distributed.checkpoint's per-rank
    failures or in the messages of Megatron's writer processes, or less than NEARLY_FULL_BYTES free.
    A stop (Ctrl-C, SystemExit) or a timed-out collective inside the save is never put down to the disk."""
    if isinstance(exc, (KeyboardInterrupt, SystemExit)) or collective_timeout.is_timeout(exc):
        return False
    if free_bytes is not None and free_bytes < NEARLY_FULL_BYTES:
        return True
    import errno

    from torch.distributed.checkpoint.api import CheckpointException

    seen, pending = set(), [exc, *take_writer_errors()]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno == errno.ENOSPC:
            return True
        # Megatron's writer processes report their OSError as text ("Worker failure: [Errno 28] ...").
        if f"[Errno {errno.ENOSPC}]" in str(current):
            return True
        if isinstance(current, CheckpointException):
            pending += [failure[0] if isinstance(failure, tuple) else failure for failure in current.failures.values()]
        pending += [current.__cause__, current.__context__]
    return False


# ---- save / load ------------------------------------------------------------------------------
def save_checkpoint(
    root: str, iteration: int, chunks, optimizer=None, common_state: dict | None = None, rank_state: dict | None = None,
    add_files=None,
) -> str:
    """Save model (+ optimizer) + ``common_state`` (plain values, identical on all ranks)
    + ``rank_state`` (plain values / tensors of this rank, e.g. RNG streams).

    ``add_files(directory)`` runs on rank 0 before publication; what it writes there is part
    of the checkpoint (and of its manifest)."""
    from megatron.core import dist_checkpointing

    install()  # before the save: the disk-full check reads the writer errors it keeps
    final_dir = os.path.join(root, checkpoint_name(iteration))
    tmp_dir = final_dir + ".tmp"
    if _rank() == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp_dir, ignore_errors=True)
        os.makedirs(tmp_dir)
    _barrier()
    state = model_sharded_state_dict(chunks)
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(dict(state), is_loading=False, metadata=OPTIMIZER_METADATA)
    state["trainer"] = dict(common_state or {})
    state[MANIFEST_MARKER] = manifest.FORMAT
    take_writer_errors()  # a failure of an earlier save is not this one's
    try:
        dist_checkpointing.save(state, tmp_dir, content_metadata=OPTIMIZER_METADATA)
        if rank_state is not None:
            path = _rank_state_path(tmp_dir, _rank())
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.save(rank_state, path)
        if add_files is not None and _rank() == 0:
            add_files(tmp_dir)
        _barrier()
        write_manifest(tmp_dir)
    except BaseException as exc:
        free = _free_bytes(root)
        if not _disk_full(exc, free):
            raise
        shutil.rmtree(tmp_dir, ignore_errors=True)  # give the space back; the save never published
        previous = latest_name(root)
        left = "" if free is None else f"; {free / 2**20:.1f} MiB were free there when it failed"
        raise CheckpointError(
            f"saving checkpoint {checkpoint_name(iteration)} into {root}: the disk is full (No space left on device{left}). "
            + (f"'{LATEST}' still names the last complete checkpoint, {previous}: " if previous else "No checkpoint of this run is complete yet: ")
            + "free space on that filesystem and relaunch the same command to resume."
        ) from exc
    if _rank() == 0:
        shutil.rmtree(final_dir, ignore_errors=True)
        os.replace(tmp_dir, final_dir)
        fsync_dir(root)
        write_atomically(os.path.join(root, LATEST), checkpoint_name(iteration) + "\n")
    _barrier()
    return final_dir


def load_checkpoint(
    path: str, chunks, optimizer=None, strict: bool = True, rank_state_loader=None, *,
    checksums: bool = True, check_common=None, advice: str | None = None, message=None,
) -> dict:
    """Verify ``path`` (see ``verify_checkpoint``), then load it into ``chunks`` (any TP/PP
    layout) and ``optimizer``; return the common state.

    ``check_common(common)`` sees the common state before any tensor is read (to refuse a
    resume early). ``rank_state_loader(state_or_None, common)`` receives this rank's saved
    rank state; None when the saving run had no such rank (a resume at a larger world) or
    saved none. A rank state file the manifest lists but the directory lacks is an error.
    ``message(text)`` prints the one line about a checkpoint that cannot be verified
    (default: stderr on rank 0). Everything is read with ``weights_only`` loads.
    """
    from megatron.core import dist_checkpointing

    if not check_before_load(path, checksums, advice):
        _note(message, f"{path}: no {manifest.MANIFEST} (written before manifests): its files cannot be verified")
    common = read_checkpoint_files(path, COMMON_STATE, lambda: dist_checkpointing.load_common_state_dict(path), advice)
    if check_common is not None:
        check_common(common.get("trainer", {}))
    state = model_sharded_state_dict(chunks)
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(dict(state), is_loading=True, metadata=OPTIMIZER_METADATA)
    if "trainer" in common:
        state["trainer"] = common["trainer"]
    loaded = read_checkpoint_files(path, "tensor shards (*.distcp, .metadata)", lambda: dist_checkpointing.load(state, path), advice)
    for key, chunk in zip(model_keys(len(chunks)), chunks):
        unwrap(chunk).load_state_dict(loaded[key], strict=strict)
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    common = loaded.get("trainer", {})
    if rank_state_loader is not None:
        rank_file = _rank_state_path(path, _rank())
        name = os.path.relpath(rank_file, path)
        saved = read_checkpoint_files(path, name, lambda: torch.load(rank_file, weights_only=True), advice) if os.path.exists(rank_file) else None
        rank_state_loader(saved, common)
    return common


def _note(message, text: str) -> None:
    if _rank() == 0:
        (message or (lambda line: print(line, file=sys.stderr, flush=True)))(text)


# ---- the set of checkpoints under a root ------------------------------------------------------
def prune(root: str, keep: int, protect=()) -> None:
    """Delete all but the ``keep`` newest complete checkpoints (and stale .tmp folders); the one
    ``latest`` names and those in ``protect`` (paths, e.g. the best evaluated checkpoint) are kept
    besides them."""
    current = latest_checkpoint(root)
    kept = [p for p in (current, *protect) if p is not None and os.path.isdir(p)]
    for name in os.listdir(root):
        if name.startswith("iter_") and name.endswith(".tmp"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    complete = iterations(root)
    for number in complete[: max(0, len(complete) - keep)]:
        path = os.path.join(root, checkpoint_name(number))
        if not any(os.path.samefile(path, p) for p in kept):
            shutil.rmtree(path, ignore_errors=True)


def prune_below(root: str, iteration: int) -> None:
    """Delete the complete checkpoints numbered below ``iteration``."""
    for number in iterations(root):
        if number < iteration:
            shutil.rmtree(os.path.join(root, checkpoint_name(number)), ignore_errors=True)


def find_root(path: str) -> str:
    """The folder of checkpoints of ``path``: a run's output_dir (its ``checkpoints/``) or the folder itself."""
    for candidate in (os.path.join(path, RUN_CHECKPOINTS), path):
        if os.path.isdir(candidate) and (os.path.exists(os.path.join(candidate, LATEST)) or iterations(candidate)):
            return candidate
    raise CheckpointError(f"{path}: no checkpoints here (neither {path}/checkpoints nor {path} holds iter_* folders)")


def describe_checkpoints(root: str, checksums: bool = True) -> list[tuple[int, bool, str]]:
    """(iteration, named by ``latest``, verification status) of every complete checkpoint."""
    named = latest_name(root)
    rows = []
    for iteration in iterations(root):
        problems = checkpoint_problems(os.path.join(root, checkpoint_name(iteration)), checksums)
        if problems is None:
            status = f"cannot be verified (no {manifest.MANIFEST}: written before manifests)"
        elif problems:
            status = f"DAMAGED: {problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
        else:
            status = "verified" if checksums else "sizes match"
        rows.append((iteration, named == checkpoint_name(iteration), status))
    return rows


def use_checkpoint(root: str, iteration: int, checksums: bool = True) -> bool:
    """Point ``latest`` at ``iteration`` after verifying it (raises CheckpointError if it fails);
    returns whether it could be verified (False: written before manifests)."""
    path = os.path.join(root, checkpoint_name(iteration))
    advice = f"Choose another iteration: anchored-checkpoint list {root}"
    if iteration not in (iterations(root) if os.path.isdir(root) else []):
        raise _failure(path, ["no such checkpoint"], advice)
    verified = verify_checkpoint(path, checksums, advice)
    write_atomically(os.path.join(root, LATEST), checkpoint_name(iteration) + "\n")
    return verified
