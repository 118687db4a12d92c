"""Everything that differs between the Megatron-Core releases this project supports.

Supported: 0.16.1 up to the newest 0.19.x (``SUPPORTED``, the same range as setup.py). Each
difference lives in one submodule here, named for the part of Megatron it touches. A workaround
decides whether it applies by probing the installed Megatron (a name that exists or not, what a
function returns) and compares release numbers only where no cheap probe can tell:

- ``optimizer``: loading the distributed optimizer's checkpoint with torch Adam (three upstream
  bugs, present in 0.16.1 - 0.19.2; applied wherever Megatron runs without apex / TE).
- ``moe``: expert-parallel MoE without Transformer Engine (0.16.x: ``te_general_gemm`` undefined;
  every release: split sizes left as tensors when they are already on the CPU).
- ``fsdp``: Megatron-FSDP on gloo and without TE (every release: PREMUL_SUM reduction, the
  prefetch-size cap; 0.16 - 0.17: ``TELinear`` is a MagicMock subclass; 0.16: grad hooks on
  frozen parameters; 0.19: releasing keeps the buckets outside the FSDP units gathered).
- ``specs``: reading a layer spec (0.18+ builds the MLP entry as a ``functools.partial``).
- ``async_writer``: the async checkpoint writer's Manager server dies with its rank (every
  release: a killed rank leaves it running; its queue getter moved from ``_get_write_results_queue``
  to ``get_write_results_queue`` in 0.19).
- ``deprecations``: the deprecation notices particular releases print (installed with the other
  warning filters by ``platform.warnings_filter``).

The checkpoint format's differences (0.19+ keeps the common state inside the torch_dist files;
0.18+ drop a failed write's errno) live with the checkpoint code, in ``checkpoint.mcore_format``,
which the checkpoint loads and saves install themselves.

``apply()`` installs the runtime patches (idempotent);
``platform.initialize`` calls it.
"""

from __future__ import annotations

import functools

SUPPORTED = ">=0.16.1,<0.20"
OLDEST = (0, 16, 1)


@functools.cache
def version() -> tuple[int, int, int]:
    """The installed Megatron-Core release. Read from ``package_info`` rather than pip metadata:
    pipelines often put a Megatron-LM source tree on PYTHONPATH, which has no metadata, and from
    0.18 ``__version__`` may carry the enclosing git commit."""
    from megatron.core import package_info

    return int(package_info.MAJOR), int(package_info.MINOR), int(package_info.PATCH)


def version_string() -> str:
    return ".".join(map(str, version()))


class UnsupportedMegatronError(RuntimeError):
    pass


def check_supported() -> None:
    """Refuse a Megatron-Core older than the oldest release the workarounds were written for.
    Newer releases are not refused (a source checkout of Megatron-LM is often ahead of PyPI);
    ``apply()`` probes each behaviour instead of trusting the number."""
    if version() < OLDEST:
        raise UnsupportedMegatronError(
            f"megatron-core {version_string()} is installed; anchored_megatron needs megatron-core{SUPPORTED}: "
            f"pip install 'megatron-core{SUPPORTED}'"
        )


def apply() -> dict[str, bool]:
    """Install every runtime workaround this Megatron-Core needs; returns {name: applied}."""
    from anchored_megatron.platform.mcore_compat import async_writer, fsdp, moe, optimizer

    check_supported()
    return {
        "optimizer": optimizer.apply(),
        "async_writer.dies_with_rank": async_writer.apply(),
        **{f"moe.{name}": applied for name, applied in moe.apply().items()},
        **{f"fsdp.{name}": applied for name, applied in fsdp.apply().items()},
    }
