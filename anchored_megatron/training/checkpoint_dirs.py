"""Where trainer checkpoints live on disk, without torch: naming, the ``latest`` pointer, and
turning what a user gives (a checkpoint, a trainer output directory, its ``checkpoints/``) into
one checkpoint directory. Config validation, the trainer and the converters all use this."""

from __future__ import annotations

import os

from anchored_megatron.config.errors import ConfigError

LATEST = "latest"
CHECKPOINTS_SUBDIR = "checkpoints"


def checkpoint_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def iterations(root: str) -> list[int]:
    """The iteration numbers of the complete checkpoints under ``root``."""
    return sorted(int(n[len("iter_"):]) for n in os.listdir(root) if n.startswith("iter_") and not n.endswith(".tmp"))


def latest_checkpoint(root: str) -> str | None:
    """The checkpoint ``root/latest`` names, or None when there is no pointer."""
    pointer = os.path.join(root, LATEST)
    if not os.path.exists(pointer):
        return None
    with open(pointer, encoding="utf-8") as fh:
        name = fh.read().strip()
    path = os.path.join(root, name)
    if not name or not os.path.isdir(path):
        raise FileNotFoundError(f"{pointer}: points at {name!r}, which does not exist")
    return path


def checkpoint_root(path: str) -> str | None:
    """The folder holding ``latest`` for a trainer output dir or its ``checkpoints/``; None otherwise."""
    for candidate in (path, os.path.join(path, CHECKPOINTS_SUBDIR)):
        if os.path.exists(os.path.join(candidate, LATEST)):
            return candidate
    return None


def resolve_checkpoint_dir(path: str, key: str, iteration: int | None = None) -> str:
    """One checkpoint directory from ``path``: a checkpoint itself, or a trainer output whose
    ``latest`` names one (``iteration`` picks another of its checkpoints). ``key`` names the
    option in errors."""
    root = checkpoint_root(path)
    if root is not None:
        if iteration is None:
            return latest_checkpoint(root)
        available = iterations(root)
        if iteration not in available:
            raise ConfigError(f"{key}: {path}: has no checkpoint of iteration {iteration} (available: {', '.join(map(str, available)) or 'none'})")
        return os.path.join(root, checkpoint_name(iteration))
    if os.path.exists(os.path.join(path, "metadata.json")):
        if iteration is not None:
            raise ConfigError(f"{key}: {path} is one checkpoint; an iteration can only be chosen in a trainer output directory")
        return path
    raise ConfigError(f"{key}: {path}: not a checkpoint (no metadata.json and no '{LATEST}' pointer)")
