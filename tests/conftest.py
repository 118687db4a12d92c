import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from anchored_megatron.platform import run_on_ranks  # noqa: E402


@pytest.fixture(scope="session")
def ranks():
    """``ranks(fn, n, *args, **kwargs)`` runs a module-level ``fn`` on n gloo ranks; returns per-rank results."""
    return run_on_ranks
