"""Everything that reads or writes a checkpoint, as Megatron-Core's dist_checkpointing is one
package for its concern:

- ``dirs``: where trainer checkpoints live (``iter_N``, ``latest``) and which one a path names
- ``manifest``: ``manifest.json``, every file of a checkpoint with its size and checksum
- ``trainer_io``: the trainer's checkpoints: atomic publication, verification, pruning, ``latest``
- ``best``: a checkpoint's eval record (``eval.json``) and the best evaluated checkpoint of a run
- ``fsdp_optimizer``: the Megatron-FSDP student's Adam state in the format DDP runs write
- ``weights``: model-only checkpoints (converted ones, or a trainer checkpoint's weights)
- ``model_config``: ``model_config.yaml`` and ``hf_config.json`` kept with a checkpoint
- ``safe_load``, ``mcore_format``: reading without executing pickle; the Megatron-Core releases'
  formats and writer errors
- ``cli``: ``anchored-checkpoint``

Every failure is a ``CheckpointError`` (``errors``). The load and save functions install what
they need from ``safe_load`` and ``mcore_format`` themselves (``install``), so a checkpoint is
never read without the restricted unpickling, whoever calls them.
"""

from anchored_megatron.checkpoint.errors import CheckpointError

__all__ = ["CheckpointError", "install"]


def install() -> dict[str, bool]:
    """Make Megatron-Core's dist_checkpointing read checkpoints without executing pickle, and keep
    its writer's errors for the disk-full check (idempotent). Returns {name: applied} for the
    patches only some releases need. Code that calls Megatron's loads directly (a Megatron-LM
    loop) calls this first."""
    from anchored_megatron.checkpoint import mcore_format, safe_load

    safe_load.install()
    return {"mcore_format.writer_errors": mcore_format.keep_writer_errors()}
