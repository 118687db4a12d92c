"""Where trainer checkpoints live on disk, without torch: naming, the ``latest`` pointer, and
turning what a user gives (a checkpoint, a trainer output directory, its ``checkpoints/``) into
one checkpoint directory. The preflight checks, the trainer and the converters all use this.
A path given as an option's value that names no checkpoint is a ConfigError naming the option."""

from __future__ import annotations

import os

from anchored_megatron.checkpoint.errors import CheckpointError
from anchored_megatron.config.errors import ConfigError

LATEST = "latest"
RUN_CHECKPOINTS = "checkpoints"  # the checkpoint root inside a trainer output_dir
RUN_CONFIG = "config.yaml"  # the resolved config a trainer writes into its output_dir


def checkpoint_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def iterations(root: str) -> list[int]:
    """The iteration numbers of the complete checkpoints under ``root``."""
    return sorted(int(n[len("iter_"):]) for n in os.listdir(root) if n.startswith("iter_") and not n.endswith(".tmp"))


def latest_name(root: str) -> str | None:
    """What ``root/latest`` says (a checkpoint's folder name), or None when there is no pointer."""
    pointer = os.path.join(root, LATEST)
    if not os.path.exists(pointer):
        return None
    with open(pointer, encoding="utf-8") as fh:
        return fh.read().strip()


def _named_by_latest(root: str) -> tuple[str | None, bool]:
    """(what ``root/latest`` says or None, whether that checkpoint exists)."""
    name = latest_name(root)
    return name, bool(name) and os.path.isdir(os.path.join(root, name))


def latest_checkpoint(root: str) -> str | None:
    """The newest complete checkpoint under ``root`` (the one ``root/latest`` names), or None
    when there is no pointer; CheckpointError when it names one that does not exist."""
    name, exists = _named_by_latest(root)
    if name is None:
        return None
    path = os.path.join(root, name)
    if not exists:
        raise CheckpointError(
            f"checkpoint {path}: '{os.path.join(root, LATEST)}' points at {name!r}, which does not exist\n{repoint_advice(path)}"
        )
    return path


def repoint_advice(path: str) -> str:
    """How to go back to the checkpoint before ``path`` (the one command that does it)."""
    root, name = os.path.split(os.path.abspath(path))
    current = int(name[len("iter_"):]) if name.startswith("iter_") and name[len("iter_"):].isdigit() else None
    earlier = [i for i in iterations(root) if current is None or i < current] if os.path.isdir(root) else []
    if earlier:
        return f"To resume from the previous checkpoint, point '{LATEST}' at it: anchored-checkpoint use {root} {earlier[-1]}"
    return f"No earlier checkpoint is left in {root}: restore the file, or start the run over in a new output_dir."


def previous_checkpoint(path: str) -> str | None:
    """The newest complete checkpoint saved before ``path`` (an ``iter_N``) in its root, or None."""
    root, name = os.path.split(os.path.normpath(path))
    current = int(name[len("iter_"):].removesuffix(".tmp"))
    earlier = [n for n in iterations(root) if n < current]
    return os.path.join(root, checkpoint_name(earlier[-1])) if earlier else None


def resolve_checkpoint_dir(path: str, key: str, iteration: int | None = None) -> str:
    """The one checkpoint directory that ``path`` (the value of option ``key``) names.

    ``path`` is a checkpoint (a directory with ``metadata.json``: a converted one, or one
    ``iter_N`` of a run), a checkpoint root holding ``latest``, or a trainer output_dir
    (whose root is ``checkpoints/``). A root gives its newest complete checkpoint, or the
    one saved at step ``iteration``.
    """
    if not os.path.isdir(path):
        raise ConfigError(f"{key}: {path}: no such directory")
    roots = [c for c in (path, os.path.join(path, RUN_CHECKPOINTS)) if os.path.isfile(os.path.join(c, LATEST))]
    if roots:
        root = roots[0]
        if iteration is None:
            name, exists = _named_by_latest(root)
            if not exists:
                raise ConfigError(f"{key}: {os.path.join(root, LATEST)}: points at {name!r}, which does not exist")
            return os.path.join(root, name)
        available = iterations(root)
        if iteration not in available:
            listed = ", ".join(str(n) for n in available) or "none"
            raise ConfigError(f"{key}: {root} holds no checkpoint of iteration {iteration} (available iterations: {listed})")
        return os.path.join(root, checkpoint_name(iteration))
    if os.path.isfile(os.path.join(path, "metadata.json")):
        if iteration is not None:
            raise ConfigError(f"{key}: {path} is a single checkpoint; iteration {iteration} can only be chosen in a trainer output_dir")
        return path
    raise ConfigError(
        f"{key}: {path}: not a checkpoint (expected a checkpoint directory with metadata.json, "
        f"or a trainer output_dir whose {RUN_CHECKPOINTS}/{LATEST} names one)"
    )
