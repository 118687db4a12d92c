"""Model-only checkpoints: a dist_checkpointing (torch_dist) directory plus ``model_config.yaml``
(``model_config``), read into and written from model chunks at any TP/PP/VPP/EP layout.

The weights of a converted checkpoint or of a trainer checkpoint load the same way: only the
model keys are read, so a trainer checkpoint's optimizer state stays on disk. Vocabulary rows:
Megatron-Core marks the embedding and output layer ``allow_shape_mismatch`` in
``GPTModel.sharded_state_dict()``, so a load zero-fills the local shard and reads the rows the
checkpoint has; a converted checkpoint (exactly ``vocab_size`` rows) therefore loads at any TP,
its padded rows (excluded from the loss by vocab_size) starting at zero.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile

import torch

from anchored_megatron.checkpoint import install, manifest
from anchored_megatron.checkpoint.errors import CheckpointError
from anchored_megatron.checkpoint.model_config import write_model_config
from anchored_megatron.checkpoint.trainer_io import (
    MANIFEST_MARKER, check_before_load, model_keys, model_sharded_state_dict, read_checkpoint_files, write_manifest,
)
from anchored_megatron.config import ModelConfig


@contextlib.contextmanager
def single_process_group():
    """A one-rank gloo group when none exists (dist_checkpointing needs torch.distributed),
    with the CPU shim active when CUDA is absent (the torch_dist writer calls torch.cuda), and
    the checkpoint package's safe loading installed (``checkpoint.install``)."""
    from anchored_megatron.platform import cpu_shim

    install()
    shim_here = not cpu_shim.is_installed() and cpu_shim.install()
    try:
        if torch.distributed.is_initialized():
            yield
            return
        # init_process_group wraps sys.excepthook to prefix tracebacks with "[rank0]: " and
        # nothing unwraps it: a process converting N times would print N prefixes per line.
        excepthook = sys.excepthook
        with tempfile.TemporaryDirectory(prefix="convert-pg-") as tmp:
            store = torch.distributed.FileStore(os.path.join(tmp, "store"), 1)
            torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
            try:
                yield
            finally:
                torch.distributed.destroy_process_group()
                sys.excepthook = excepthook
    finally:
        if shim_here:
            cpu_shim.uninstall()


def load_megatron_weights(chunks, ckpt_dir: str, checksums: bool = True) -> None:
    """Load a converted or trainer checkpoint into this rank's model chunks (any TP/PP/VPP).

    Collective: every rank of the job calls it. Only the model keys are read, so a trainer
    checkpoint's optimizer state is left on disk. A directory with a ``manifest.json`` (a
    trainer checkpoint) is verified against it first (checksums unless ``checksums=False``).
    """
    from megatron.core import dist_checkpointing

    from anchored_megatron.models.layout import unwrap

    advice = f"Re-create {ckpt_dir} (anchored-convert, or copy it again from where it came from)."
    check_before_load(ckpt_dir, checksums, advice)
    loaded = read_checkpoint_files(ckpt_dir, "model weights (common.pt, *.distcp, .metadata)", lambda: dist_checkpointing.load(model_sharded_state_dict(chunks), ckpt_dir), advice)
    for i, (key, chunk) in enumerate(zip(model_keys(len(chunks)), chunks)):
        state = loaded[key]
        # Non-strict only for ``_extra_state`` (GPTModel drops output_layer's from its sharded dict).
        result = unwrap(chunk).load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
        if missing or result.unexpected_keys:
            raise CheckpointError(f"{ckpt_dir}: loading chunk {i} left missing={missing} unexpected={result.unexpected_keys}")


def save_megatron_weights(chunks, ckpt_dir: str, model: ModelConfig) -> None:
    """Save this rank's chunks as a model-only dist checkpoint + model_config.yaml (collective)."""
    if torch.distributed.get_rank() == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
    torch.distributed.barrier()
    save_weights_state(model_sharded_state_dict(chunks), ckpt_dir, model)


def save_weights_state(state: dict, ckpt_dir: str, model: ModelConfig, hf_config_file: str | None = None) -> None:
    """Save a sharded state dict of model weights into the existing ``ckpt_dir`` (collective):
    the torch_dist files, ``model_config.yaml`` (with ``hf_config_file`` kept as hf_config.json,
    see ``model_config.write_model_config``) and, last, the manifest."""
    from megatron.core import dist_checkpointing

    install()
    dist_checkpointing.save({**state, MANIFEST_MARKER: manifest.FORMAT}, ckpt_dir)
    if torch.distributed.get_rank() == 0:
        write_model_config(ckpt_dir, model, hf_config_file)
    torch.distributed.barrier()
    write_manifest(ckpt_dir)
