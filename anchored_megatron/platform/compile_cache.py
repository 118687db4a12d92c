"""Where ``torch.compile`` keeps the compiled loss kernels between runs.

Inductor writes what it compiles to an on-disk cache (the FX graph cache with the generated
C++ / Triton code, and the AOT-autograd cache; both on by default) under
``/tmp/torchinductor_<user>``. /tmp is emptied at reboot, is fresh in every container and, on
many clusters, in every job: each such start compiles the loss kernels again, which takes tens
of seconds (docs/benchmarks.md). The project's commands use ``~/.cache/anchored_megatron/inductor``
instead (about 1 MB); a ``TORCHINDUCTOR_CACHE_DIR`` set by the user is kept, e.g. a node-local
disk when home is a slow network filesystem.
"""

from __future__ import annotations

import os

CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


def default_dir() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "anchored_megatron", "inductor")


def use_persistent_cache() -> str:
    """Point Inductor at the persistent cache unless the user chose one; returns the directory.
    Call before the first compile; processes started afterwards inherit it."""
    return os.environ.setdefault(CACHE_ENV, default_dir())

