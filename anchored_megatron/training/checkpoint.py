"""Checkpoints with dist_checkpointing (torch_dist): reshardable across TP/PP/DP.

Layout of ``<root>``::

    iter_0000120/        one complete checkpoint (model, optimizer, trainer state)
    iter_0000120.tmp/    a save in progress; never read
    latest               text file naming the newest complete checkpoint

A save writes into ``iter_N.tmp``, all ranks meet at a barrier, then rank 0
renames the folder and replaces ``latest`` atomically (write + fsync + rename).
A process killed mid-save therefore leaves the previous checkpoint and its
``latest`` pointer untouched.
"""

from __future__ import annotations

import os
import shutil

import torch

from anchored_megatron.models.layout import unwrap

LATEST = "latest"
# Only the distributed optimizer's fully reshardable format survives a change of TP/PP/DP.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def checkpoint_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


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


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path))


def _fsync_dir(path: str) -> None:
    fd = os.open(path or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


RANK_STATE_DIR = "rank_state"


def _rank_state_path(directory: str, rank: int) -> str:
    return os.path.join(directory, RANK_STATE_DIR, f"rank_{rank:05d}.pt")


def save_checkpoint(
    root: str, iteration: int, chunks, optimizer=None, common_state: dict | None = None, rank_state: dict | None = None
) -> str:
    """Save model (+ optimizer) + ``common_state`` (plain values, identical on all ranks)
    + ``rank_state`` (plain values / tensors of this rank, e.g. RNG streams)."""
    from megatron.core import dist_checkpointing

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
    dist_checkpointing.save(state, tmp_dir, content_metadata=OPTIMIZER_METADATA)
    if rank_state is not None:
        path = _rank_state_path(tmp_dir, _rank())
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save(rank_state, path)
    _barrier()
    if _rank() == 0:
        shutil.rmtree(final_dir, ignore_errors=True)
        os.replace(tmp_dir, final_dir)
        _fsync_dir(root)
        _atomic_write(os.path.join(root, LATEST), checkpoint_name(iteration) + "\n")
    _barrier()
    return final_dir


def latest_checkpoint(root: str) -> str | None:
    """The newest complete checkpoint under ``root``, or None."""
    pointer = os.path.join(root, LATEST)
    if not os.path.exists(pointer):
        return None
    with open(pointer, encoding="utf-8") as fh:
        name = fh.read().strip()
    path = os.path.join(root, name)
    if not name or not os.path.isdir(path):
        raise FileNotFoundError(f"{pointer}: points at {name!r}, which does not exist")
    return path


def load_checkpoint(path: str, chunks, optimizer=None, strict: bool = True, rank_state_loader=None) -> dict:
    """Load into ``chunks`` (any TP/PP layout) and ``optimizer``; return the common state.

    ``rank_state_loader(state_or_None, common)`` receives this rank's saved rank state, if any.
    Everything is read with ``weights_only`` loads: no arbitrary pickle is executed.
    """
    from megatron.core import dist_checkpointing

    from anchored_megatron.platform.mcore_compat import checkpoint_format

    checkpoint_format.check_readable(path)
    state = model_sharded_state_dict(chunks)
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(dict(state), is_loading=True, metadata=OPTIMIZER_METADATA)
    common = dist_checkpointing.load_common_state_dict(path)
    if "trainer" in common:
        state["trainer"] = common["trainer"]
    loaded = dist_checkpointing.load(state, path)
    for key, chunk in zip(model_keys(len(chunks)), chunks):
        unwrap(chunk).load_state_dict(loaded[key], strict=strict)
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    common = loaded.get("trainer", {})
    if rank_state_loader is not None:
        rank_file = _rank_state_path(path, _rank())
        rank_state_loader(torch.load(rank_file, weights_only=True) if os.path.exists(rank_file) else None, common)
    return common


def prune(root: str, keep: int) -> None:
    """Delete all but the ``keep`` newest complete checkpoints (and stale .tmp folders);
    the one ``latest`` names is always kept."""
    current = latest_checkpoint(root)
    for name in os.listdir(root):
        if name.startswith("iter_") and name.endswith(".tmp"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    complete = iterations(root)
    for number in complete[: max(0, len(complete) - keep)]:
        path = os.path.join(root, checkpoint_name(number))
        if current is None or not os.path.samefile(path, current):
            shutil.rmtree(path, ignore_errors=True)


def iterations(root: str) -> list[int]:
    """The iteration numbers of the complete checkpoints under ``root``."""
    return sorted(int(n[len("iter_"):]) for n in os.listdir(root) if n.startswith("iter_") and not n.endswith(".tmp"))


def prune_below(root: str, iteration: int) -> None:
    """Delete the complete checkpoints numbered below ``iteration``."""
    for number in iterations(root):
        if number < iteration:
            shutil.rmtree(os.path.join(root, checkpoint_name(number)), ignore_errors=True)
