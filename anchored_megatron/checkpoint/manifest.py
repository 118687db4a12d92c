"""``manifest.json``: every file of a checkpoint with its size and checksum.

A checkpoint is a directory of files written by many ranks; a bit flip, a truncated
shard or a deleted file would otherwise load without error (or fail deep inside
torch with EOFError). The manifest is written inside ``iter_N.tmp`` before the
directory is published, so a published checkpoint always has a complete one, and
verification compares the directory against it: no file missing, none extra, every
size and (unless switched off) every checksum equal.

The checksum is XXH3-128 (the ``xxhash`` package, already a dependency of
``datasets``): it detects corruption, not tampering (whoever can rewrite a shard can
rewrite the manifest), and at several GB/s per core it costs a fraction of writing
or reading the bytes (figures in docs/benchmarks.md). This module is torch-free; the
collective parts (who hashes which file) live in ``trainer_io.py``.
"""

from __future__ import annotations

import heapq
import json
import os
import re

import xxhash

from anchored_megatron.checkpoint.errors import CheckpointError

MANIFEST = "manifest.json"
ALGORITHM = "xxh3_128"
FORMAT = 1
_CHUNK = 16 << 20
# Files Megatron's torch_dist writer and our rank state give one rank each: the rank
# that wrote a file hashes it, while its bytes are still in that node's page cache.
_WRITER = (re.compile(r"^__(\d+)_\d+\.distcp$"), re.compile(r"^rank_state/rank_(\d+)\.pt$"))
# What identifies a checkpoint without reading its tensors: the model config, Megatron's
# and torch's metadata (shapes, dtypes, storage layout) and, when there is one, the manifest.
_IDENTITY_FILES = (MANIFEST, "model_config.yaml", "metadata.json", ".metadata", "common.pt")


def list_files(directory: str) -> list[str]:
    """Relative paths of every file under ``directory`` except the manifest, sorted."""
    names = []
    for parent, _, files in os.walk(directory):
        for name in files:
            rel = os.path.relpath(os.path.join(parent, name), directory).replace(os.sep, "/")
            if rel != MANIFEST:
                names.append(rel)
    return sorted(names)


def hash_file(path: str) -> tuple[int, str]:
    """(bytes read, XXH3-128 hex digest) of one file."""
    digest = xxhash.xxh3_128()
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    size = 0
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buffer):
            digest.update(view[:n])
            size += n
    return size, digest.hexdigest()


def writer_rank(name: str, world_size: int) -> int:
    """The rank that hashes ``name`` at save time: its writer where the name tells, else 0."""
    for pattern in _WRITER:
        match = pattern.match(name)
        if match:
            return int(match.group(1)) % world_size
    return 0


def hash_entries(directory: str, names: list[str]) -> dict[str, dict]:
    entries = {}
    for name in names:
        size, digest = hash_file(os.path.join(directory, name))
        entries[name] = {"size": size, "digest": digest}
    return entries


def write_manifest(directory: str, entries: dict[str, dict]) -> None:
    manifest = {"format": FORMAT, "algorithm": ALGORITHM, "files": dict(sorted(entries.items()))}
    path = os.path.join(directory, MANIFEST)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())


def read_manifest(directory: str) -> dict | None:
    """The manifest's ``files`` table, or None when the directory has no manifest; CheckpointError
    when the manifest itself cannot be used (unreadable, or of an unknown format)."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            manifest = json.load(fh)
        files = manifest["files"]
        if manifest.get("format") != FORMAT or manifest.get("algorithm") != ALGORITHM:
            raise CheckpointError(f"format {manifest.get('format')!r} / algorithm {manifest.get('algorithm')!r}, expected {FORMAT} / {ALGORITHM!r}")
        return {name: {"size": int(e["size"]), "digest": str(e["digest"])} for name, e in files.items()}
    except CheckpointError as exc:
        raise CheckpointError(f"{MANIFEST}: {exc}") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{MANIFEST}: unreadable ({type(exc).__name__}: {exc})") from None


def listing_problems(directory: str, files: dict[str, dict]) -> list[str]:
    """Files missing, unexpected, or of another size than the manifest says (stat only)."""
    present = set(list_files(directory))
    problems = [f"{name}: missing" for name in sorted(set(files) - present)]
    problems += [f"{name}: not in {MANIFEST} (a file the save did not write)" for name in sorted(present - set(files))]
    for name in sorted(set(files) & present):
        size = os.path.getsize(os.path.join(directory, name))
        if size != files[name]["size"]:
            problems.append(f"{name}: {size} bytes, {MANIFEST} says {files[name]['size']}")
    return problems


def checksum_problems(directory: str, files: dict[str, dict], names: list[str]) -> list[str]:
    """Files among ``names`` whose content no longer has the manifest's checksum."""
    problems = []
    for name in names:
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            continue  # reported by listing_problems
        size, digest = hash_file(path)
        if size == files[name]["size"] and digest != files[name]["digest"]:
            problems.append(f"{name}: content differs from its {ALGORITHM} checksum in {MANIFEST} (the file is damaged)")
    return problems


def balanced_shares(files: dict[str, dict], world_size: int) -> list[list[str]]:
    """Split the files over ``world_size`` ranks with about equal bytes each (largest first
    to the least loaded rank); the same answer on every rank."""
    shares: list[list[str]] = [[] for _ in range(world_size)]
    loads = [(0, rank) for rank in range(world_size)]
    for name in sorted(files, key=lambda n: (-files[n]["size"], n)):
        load, rank = heapq.heappop(loads)
        shares[rank].append(name)
        heapq.heappush(loads, (load + files[name]["size"], rank))
    return shares


def metadata_digest(directory: str) -> str:
    """A digest of the files that identify a checkpoint (never its tensor shards)."""
    digest = xxhash.xxh3_128()
    for name in _IDENTITY_FILES:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            size, file_digest = hash_file(path)
            digest.update(f"{name}\0{size}\0{file_digest}\n".encode())
    return digest.hexdigest()
