"""On-disk cache of packed SFT sequences: one directory per (data, tokenizer, layout) key.

Written to a private temporary directory and renamed into place, so a reader never
sees a half-written cache and concurrent builders (one per node without a shared
file system) cannot corrupt each other.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile

import numpy as np

from anchored_megatron.platform.files import file_sha256

FORMAT_VERSION = 1
ARRAYS = ("tokens", "trained", "doc_lengths", "seq_offsets")


def _file_identity(path: str) -> list:
    st = os.stat(path)
    return [os.path.abspath(path), st.st_size, st.st_mtime_ns]


def cache_key(cfg, tokenizer, template: str, seq_length: int, seed: int) -> str:
    weights = list(cfg.weights) if cfg.weights else None
    # The seed only matters when fractional weights pick a random subset of a file.
    seeded = weights is not None and any(float(w) != int(w) for w in weights)
    material = {
        "version": FORMAT_VERSION,
        "files": [_file_identity(p) for p in cfg.paths],
        "weights": weights,
        "tokenizer": tokenizer.fingerprint,
        "tokenizer_files": [file_sha256(p) for p in tokenizer.source_files],
        "template": hashlib.sha256(template.encode()).hexdigest(),
        "seq_length": seq_length,
        "packing": cfg.packing,
        "truncate": cfg.truncate,
        "on_bad_record": cfg.on_bad_record,
        "seed": seed if seeded else None,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:20]


def exists(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, "stats.json"))


def error_file(directory: str) -> str:
    return directory.rstrip("/") + ".error"


def write(directory: str, arrays: dict[str, np.ndarray], stats: dict) -> None:
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=os.path.basename(directory) + ".tmp-", dir=parent)
    try:
        for name in ARRAYS:
            np.save(os.path.join(staging, f"{name}.npy"), arrays[name])
        with open(os.path.join(staging, "stats.json"), "w") as fh:  # written last: marks completeness
            json.dump(stats, fh, indent=1, sort_keys=True)
        try:
            os.rename(staging, directory)
        except OSError:
            if not exists(directory):  # lost a race only if the other builder finished
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def read(directory: str) -> tuple[dict[str, np.ndarray], dict]:
    # Memory-mapped: ranks on one node share the page cache instead of each holding a copy.
    arrays = {name: np.load(os.path.join(directory, f"{name}.npy"), mmap_mode="r") for name in ARRAYS}
    with open(os.path.join(directory, "stats.json")) as fh:
        stats = json.load(fh)
    return arrays, stats
