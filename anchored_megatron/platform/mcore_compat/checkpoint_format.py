"""The torch_dist checkpoint format changed once, one way, in megatron-core 0.19.

Up to 0.18 the common (non-tensor) state is a separate ``common.pt`` beside the torch_dist files.
From 0.19 it is stored inside the torch_dist files and there is no ``common.pt``. 0.19 reads both
formats; 0.16.1 - 0.18 fail on the new one deep inside the load (``FileNotFoundError: common.pt``),
so a checkpoint written by 0.19 is refused up front here, saying what to install.
"""

from __future__ import annotations

import os

COMMON_STATE_FILE = "common.pt"
METADATA_FILE = "metadata.json"
# The first release that reads (and writes) the embedded common state.
EMBEDDED_COMMON_STATE = (0, 19, 0)


class CheckpointFormatError(RuntimeError):
    pass


def reads_embedded_common_state() -> bool:
    from anchored_megatron.platform.mcore_compat import version

    # The older releases are fixed history: their number says exactly what they cannot read.
    return version() >= EMBEDDED_COMMON_STATE


def check_readable(checkpoint_dir: str) -> None:
    """Raise CheckpointFormatError when the installed Megatron-Core cannot read ``checkpoint_dir``."""
    if reads_embedded_common_state():
        return
    if not os.path.isfile(os.path.join(checkpoint_dir, METADATA_FILE)):
        return  # not a dist checkpoint at all: the loader's own error says so
    if os.path.exists(os.path.join(checkpoint_dir, COMMON_STATE_FILE)):
        return
    from anchored_megatron.platform.mcore_compat import version_string

    raise CheckpointFormatError(
        f"{checkpoint_dir}: this checkpoint was written by megatron-core 0.19 or newer (its common state is inside "
        f"the torch_dist files; there is no {COMMON_STATE_FILE}), which megatron-core {version_string()} cannot read. "
        "Load it with megatron-core 0.19: pip install 'megatron-core>=0.19,<0.20' (on Python 3.11 add "
        "--no-deps --ignore-requires-python; `make setup MEGATRON_CORE=0.19.2` builds such a venv)"
    )
