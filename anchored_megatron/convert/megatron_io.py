"""The Megatron side: a dist_checkpointing (torch_dist) directory plus ``model_config.yaml``.

Vocabulary padding. The converter saves ``embedding.word_embeddings.weight`` and
``output_layer.weight`` with exactly ``vocab_size`` rows (no padding), so the checkpoint
does not depend on any TP layout. Megatron-Core marks both tensors ``allow_shape_mismatch``
in ``GPTModel.sharded_state_dict()``: on load it zero-fills the local shard and reads the
rows the checkpoint has, so a trainer at any TP loads them with a plain
``dist_checkpointing.load`` and its padded rows (excluded from the loss by vocab_size)
start at zero. Checkpoints the trainer writes hold the padded rows of its own TP; export
reads whatever row count is stored and keeps the first ``vocab_size``.

Every other tensor is saved as a TP=1/PP=1 model would save it (layers stacked on a leading
axis under one key, fc1 as two fragments), built directly from per-tensor data, so
conversion never instantiates a model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
from pathlib import Path

import torch

from anchored_megatron.config import ModelConfig, build
from anchored_megatron.convert.errors import ConvertError
from anchored_megatron.convert.mapping import EXTRA_STATE_LINEARS, Rule

MODEL_CONFIG_NAME = "model_config.yaml"
HF_CONFIG_NAME = "hf_config.json"  # the source config.json, kept so export can reproduce it exactly
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@contextlib.contextmanager
def single_process_group():
    """A one-rank gloo group when none exists (dist_checkpointing needs torch.distributed),
    with the CPU shim active when CUDA is absent (the torch_dist writer calls torch.cuda)."""
    from anchored_megatron.platform import cpu_shim, safe_load

    safe_load.install()
    shim_here = not cpu_shim.is_installed() and cpu_shim.install()
    try:
        if torch.distributed.is_initialized():
            yield
            return
        with tempfile.TemporaryDirectory(prefix="convert-pg-") as tmp:
            store = torch.distributed.FileStore(os.path.join(tmp, "store"), 1)
            torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
            try:
                yield
            finally:
                torch.distributed.destroy_process_group()
    finally:
        if shim_here:
            cpu_shim.uninstall()


def sharded_tensor(rule: Rule, data: torch.Tensor, num_layers: int):
    """The ShardedTensor a TP=1/PP=1 GPTModel would save for this entry, holding ``data``."""
    from megatron.core.dist_checkpointing import ShardedTensor

    offsets = []
    prepend = 0
    if rule.layer is not None:
        offsets.append((0, rule.layer, num_layers))
        prepend = 1
    if rule.fragment is not None:
        offsets.append((prepend, rule.fragment[0], rule.fragment[1]))
    return ShardedTensor.from_rank_offsets(rule.key, data, *offsets, replica_id=0, prepend_axis_num=prepend)


def extra_state_objects(layer: int, num_layers: int) -> dict:
    """The (empty) ``_extra_state`` ShardedObjects Megatron saves for one layer's linears."""
    from megatron.core.dist_checkpointing import ShardedObject

    return {
        f"decoder.layers.{layer}.{name}._extra_state": ShardedObject(
            f"decoder.layers.{name}._extra_state", None, (num_layers,), (layer,), replica_id=0
        )
        for name in EXTRA_STATE_LINEARS
    }


def entry_name(rule: Rule) -> str:
    """A unique state-dict key for ``rule`` (the structure key; the sharded key is ``rule.key``)."""
    name = rule.key if rule.layer is None else rule.key.replace("decoder.layers.", f"decoder.layers.{rule.layer}.", 1)
    return name if rule.fragment is None else f"{name}.fragment{rule.fragment[0]}"


def write_model_config(ckpt_dir: str, model: ModelConfig, hf_config: dict | None = None) -> None:
    import yaml

    with open(os.path.join(ckpt_dir, MODEL_CONFIG_NAME), "w", encoding="utf-8") as fh:
        yaml.safe_dump(dataclasses.asdict(model), fh, sort_keys=False)
    if hf_config is not None:
        with open(os.path.join(ckpt_dir, HF_CONFIG_NAME), "w", encoding="utf-8") as fh:
            json.dump(hf_config, fh, indent=2, sort_keys=True)


def load_model_config(ckpt_dir: str) -> ModelConfig:
    """The ModelConfig stored next to a converted (or trainer) checkpoint."""
    from anchored_megatron.config import ConfigError, load_yaml

    path = os.path.join(ckpt_dir, MODEL_CONFIG_NAME)
    if not os.path.exists(path):
        raise ConvertError(f"{path}: not found (a converted checkpoint has its model config there)")
    try:
        model = build(ModelConfig, load_yaml(path), "model")
        model.validate()
    except ConfigError as exc:
        raise ConvertError(f"{path}: {exc}") from None
    return model


def load_hf_config(ckpt_dir: str) -> dict | None:
    path = os.path.join(ckpt_dir, HF_CONFIG_NAME)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def stored_shapes(ckpt_dir: str) -> dict[str, tuple[int, ...]]:
    """Global shape of every tensor in a dist checkpoint, by sharded key (metadata only)."""
    from megatron.core import dist_checkpointing

    if not os.path.exists(os.path.join(ckpt_dir, "metadata.json")):
        raise ConvertError(f"{ckpt_dir}: not a dist_checkpointing directory (no metadata.json)")
    metadata = dist_checkpointing.load_tensors_metadata(ckpt_dir)
    return {key: tuple(t.global_shape) for key, t in metadata.items()}


def load_entries(ckpt_dir: str, rules: list[Rule], model: ModelConfig, shapes: dict, dtype: torch.dtype | None = None) -> dict[Rule, torch.Tensor]:
    """Read exactly these entries (one dist_checkpointing read; only their bytes are touched)."""
    from megatron.core.dist_checkpointing.serialization import get_default_load_sharded_strategy

    request = {}
    for rule in rules:
        if rule.key not in shapes:
            raise ConvertError(f"{ckpt_dir}: checkpoint has no tensor {rule.key} (is it a model checkpoint of this config?)")
        global_shape = shapes[rule.key]
        local_shape = list(global_shape[1:] if rule.layer is not None else global_shape)
        if rule.fragment is not None:
            local_shape[0] //= rule.fragment[1]
        request[entry_name(rule)] = _read_request(rule, torch.empty(local_shape, dtype=dtype or torch.float32), global_shape)
    strategy = get_default_load_sharded_strategy(ckpt_dir)
    loaded = strategy.load(request, Path(ckpt_dir))
    return {rule: loaded[entry_name(rule)][0] if rule.layer is not None else loaded[entry_name(rule)] for rule in rules}


def _read_request(rule: Rule, data: torch.Tensor, global_shape: tuple[int, ...]):
    """A ShardedTensor asking for one entry alone.

    Unlike ``sharded_tensor`` the layer axis is a real axis of ``data`` (shape [1, ...]):
    the prepended-axis form assumes this rank asks for every layer it holds in one read,
    which a per-layer streaming read does not.
    """
    from megatron.core.dist_checkpointing import ShardedTensor

    offsets = []
    if rule.layer is not None:
        data = data.unsqueeze(0)
        offsets.append((0, rule.layer, global_shape[0]))
    if rule.fragment is not None:
        offsets.append((1 if rule.layer is not None else 0, rule.fragment[0], rule.fragment[1]))
    tensor = ShardedTensor.from_rank_offsets(rule.key, data, *offsets, replica_id=0)
    if tuple(tensor.global_shape) != tuple(global_shape):
        raise ConvertError(f"{rule.label}: checkpoint holds shape {list(global_shape)}, expected {list(tensor.global_shape)}")
    return tensor




def load_megatron_weights(chunks, ckpt_dir: str) -> None:
    """Load a converted or trainer checkpoint into this rank's model chunks (any TP/PP/VPP).

    Collective: every rank of the job calls it. Only the model keys are read, so a trainer
    checkpoint's optimizer state is left on disk.
    """
    from megatron.core import dist_checkpointing

    from anchored_megatron.models.layout import unwrap
    from anchored_megatron.platform.mcore_compat import checkpoint_format
    from anchored_megatron.training.checkpoint import model_keys, model_sharded_state_dict

    checkpoint_format.check_readable(ckpt_dir)
    loaded = dist_checkpointing.load(model_sharded_state_dict(chunks), ckpt_dir)
    for i, (key, chunk) in enumerate(zip(model_keys(len(chunks)), chunks)):
        state = loaded[key]
        # Non-strict only for ``_extra_state`` (GPTModel drops output_layer's from its sharded dict).
        result = unwrap(chunk).load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
        if missing or result.unexpected_keys:
            raise ConvertError(f"{ckpt_dir}: loading chunk {i} left missing={missing} unexpected={result.unexpected_keys}")


def save_megatron_weights(chunks, ckpt_dir: str, model: ModelConfig) -> None:
    """Save this rank's chunks as a model-only dist checkpoint + model_config.yaml (collective)."""
    from megatron.core import dist_checkpointing

    if torch.distributed.get_rank() == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
    torch.distributed.barrier()
    from anchored_megatron.training.checkpoint import model_sharded_state_dict

    dist_checkpointing.save(model_sharded_state_dict(chunks), ckpt_dir)
    if torch.distributed.get_rank() == 0:
        write_model_config(ckpt_dir, model)
    torch.distributed.barrier()
