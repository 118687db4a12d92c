"""The Megatron side: a dist_checkpointing (torch_dist) directory plus ``model_config.yaml``,
and ``hf_config.json``, the source HF config.json byte for byte. Conversion writes it and
every trainer checkpoint carries it on, so export writes back the config the model came with.

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
import os
import shutil
import tempfile
from pathlib import Path

import torch

from anchored_megatron.config import ModelConfig
from anchored_megatron.convert.errors import ConvertError
from anchored_megatron.convert.hf_io import read_json
from anchored_megatron.convert.mapping import ATTENTION_LINEARS, EXPERT_LINEARS, EXPERTS_KEY, EXTRA_STATE_LINEARS, Rule

HF_CONFIG_NAME = "hf_config.json"  # a byte copy of the source config.json, so export can reproduce it
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


def _leading_axes(rule: Rule, num_layers: int) -> list[tuple[int, int, int]]:
    """(axis, index, count) of the stacked leading axes: the layer, then a MoE expert."""
    axes = []
    if rule.layer is not None:
        axes.append((0, rule.layer, num_layers))
    if rule.expert is not None:
        axes.append((len(axes), *rule.expert))
    return axes


def sharded_tensor(rule: Rule, data: torch.Tensor, num_layers: int):
    """The ShardedTensor a TP=1/PP=1 GPTModel would save for this entry, holding ``data``."""
    from megatron.core.dist_checkpointing import ShardedTensor

    offsets = _leading_axes(rule, num_layers)
    prepend = len(offsets)
    if rule.fragment is not None:
        offsets.append((prepend, rule.fragment[0], rule.fragment[1]))
    return ShardedTensor.from_rank_offsets(rule.key, data, *offsets, replica_id=0, prepend_axis_num=prepend)


def extra_state_objects(layer: int, model: ModelConfig) -> dict:
    """The (empty) ``_extra_state`` ShardedObjects Megatron saves for one layer's linears
    (for a MoE layer: attention's and every expert's, indexed by layer and expert)."""
    from megatron.core.dist_checkpointing import ShardedObject

    num_layers = model.num_layers
    names = ATTENTION_LINEARS if model.is_moe else EXTRA_STATE_LINEARS
    out = {
        f"decoder.layers.{layer}.{name}._extra_state": ShardedObject(
            f"decoder.layers.{name}._extra_state", None, (num_layers,), (layer,), replica_id=0
        )
        for name in names
    }
    for e in range(model.num_moe_experts or 0):
        for name in EXPERT_LINEARS:
            out[f"decoder.layers.{layer}.mlp.experts.{e}.{name}._extra_state"] = ShardedObject(
                f"{EXPERTS_KEY}{name}._extra_state", None, (num_layers, model.num_moe_experts), (layer, e), replica_id=0
            )
    return out


def entry_name(rule: Rule) -> str:
    """A unique state-dict key for ``rule`` (the structure key; the sharded key is ``rule.key``)."""
    name = rule.key if rule.layer is None else rule.key.replace("decoder.layers.", f"decoder.layers.{rule.layer}.", 1)
    if rule.expert is not None:
        name += f".expert{rule.expert[0]}"
    return name if rule.fragment is None else f"{name}.fragment{rule.fragment[0]}"


def write_model_config(ckpt_dir: str, model: ModelConfig, hf_config_file: str | None = None) -> None:
    """``model_config.yaml``, plus a byte copy of ``hf_config_file`` (the HF config.json the
    weights descend from) as ``hf_config.json`` so export can give it back unchanged."""
    from anchored_megatron.config.stored import write_model_config as write_yaml

    write_yaml(ckpt_dir, model)
    if hf_config_file is not None:
        shutil.copyfile(hf_config_file, os.path.join(ckpt_dir, HF_CONFIG_NAME))


def write_trainer_model_config(ckpt_dir: str, model: ModelConfig, student_checkpoint: str | None) -> None:
    """The model files of a trainer checkpoint ``<root>/iter_N``, carrying the HF config along.

    The HF config comes from where the weights descend: the run's previous checkpoint (so a
    resumed run keeps it), else the student's source checkpoint. Neither holding one (a
    random-init run) leaves it out, and export synthesises a config.
    """
    from anchored_megatron.training.checkpoint_dirs import previous_checkpoint, resolve_checkpoint_dir

    previous = previous_checkpoint(ckpt_dir)
    source = kept_hf_config_file(previous) if previous is not None else None
    if source is None and student_checkpoint is not None:
        source = kept_hf_config_file(resolve_checkpoint_dir(student_checkpoint, "student.checkpoint"))
    write_model_config(ckpt_dir, model, source)


def kept_hf_config_file(ckpt_dir: str) -> str | None:
    """The HF config.json kept with a checkpoint, or None when it has none."""
    path = os.path.join(ckpt_dir, HF_CONFIG_NAME)
    return path if os.path.isfile(path) else None


def checkpoint_dir(path: str, iteration: int | None = None) -> str:
    """The checkpoint ``--ckpt`` names: a checkpoint directory, or a trainer output_dir
    (its newest checkpoint, or the one saved at step ``iteration``)."""
    from anchored_megatron.config import ConfigError
    from anchored_megatron.training.checkpoint_dirs import resolve_checkpoint_dir

    try:
        return resolve_checkpoint_dir(path, "--ckpt", iteration)
    except ConfigError as exc:
        raise ConvertError(str(exc)) from None


def load_model_config(ckpt_dir: str) -> ModelConfig:
    """The ModelConfig stored next to a converted (or trainer) checkpoint."""
    from anchored_megatron.config import ConfigError
    from anchored_megatron.config.stored import MODEL_CONFIG_NAME, read_model_config

    try:
        model = read_model_config(ckpt_dir, "--ckpt")
    except ConfigError as exc:
        raise ConvertError(str(exc)) from None
    if model is None:
        path = os.path.join(ckpt_dir, MODEL_CONFIG_NAME)
        raise ConvertError(f"{path}: not found (a converted checkpoint has its model config there)")
    return model


def load_hf_config(ckpt_dir: str) -> dict | None:
    """The HF config kept with a checkpoint (keys in their source order), or None."""
    path = kept_hf_config_file(ckpt_dir)
    return read_json(path) if path is not None else None


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
        leading = len(_leading_axes(rule, model.num_layers))
        local_shape = list(global_shape[leading:])
        if rule.fragment is not None:
            local_shape[0] //= rule.fragment[1]
        request[entry_name(rule)] = _read_request(rule, torch.empty(local_shape, dtype=dtype or torch.float32), global_shape)
    strategy = get_default_load_sharded_strategy(ckpt_dir)
    loaded = strategy.load(request, Path(ckpt_dir))
    out = {}
    for rule in rules:
        tensor = loaded[entry_name(rule)]
        for _ in _leading_axes(rule, model.num_layers):
            tensor = tensor[0]
        out[rule] = tensor
    return out


def _read_request(rule: Rule, data: torch.Tensor, global_shape: tuple[int, ...]):
    """A ShardedTensor asking for one entry alone.

    Unlike ``sharded_tensor`` the layer (and expert) axes are real axes of ``data`` (shape
    [1, ...]): the prepended-axis form assumes this rank asks for every layer it holds in one
    read, which a per-layer streaming read does not.
    """
    from megatron.core.dist_checkpointing import ShardedTensor

    offsets = _leading_axes(rule, global_shape[0])
    for _ in offsets:
        data = data.unsqueeze(0)
    if rule.fragment is not None:
        offsets.append((len(offsets), rule.fragment[0], rule.fragment[1]))
    tensor = ShardedTensor.from_rank_offsets(rule.key, data, *offsets, replica_id=0)
    if tuple(tensor.global_shape) != tuple(global_shape):
        raise ConvertError(f"{rule.label}: checkpoint holds shape {list(global_shape)}, expected {list(tensor.global_shape)}")
    return tensor




def load_megatron_weights(chunks, ckpt_dir: str, checksums: bool = True) -> None:
    """Load a converted or trainer checkpoint into this rank's model chunks (any TP/PP/VPP).

    Collective: every rank of the job calls it. Only the model keys are read, so a trainer
    checkpoint's optimizer state is left on disk. A directory with a ``manifest.json`` (a
    trainer checkpoint) is verified against it first (checksums unless ``checksums=False``).
    """
    from megatron.core import dist_checkpointing

    from anchored_megatron.models.layout import unwrap
    from anchored_megatron.platform import safe_load
    from anchored_megatron.platform.mcore_compat import checkpoint_format
    from anchored_megatron.training.checkpoint import model_keys, model_sharded_state_dict, read_checkpoint_files, verify_checkpoint

    safe_load.install()
    safe_load.refuse_unsafe_torch_load(ckpt_dir)
    checkpoint_format.check_readable(ckpt_dir)
    advice = f"Re-create {ckpt_dir} (anchored-convert, or copy it again from where it came from)."
    verify_checkpoint(ckpt_dir, checksums, advice)
    loaded = read_checkpoint_files(ckpt_dir, "model weights (common.pt, *.distcp, .metadata)", lambda: dist_checkpointing.load(model_sharded_state_dict(chunks), ckpt_dir), advice)
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
    from anchored_megatron.training import manifest
    from anchored_megatron.training.checkpoint import MANIFEST_MARKER, model_sharded_state_dict, write_manifest

    dist_checkpointing.save({**model_sharded_state_dict(chunks), MANIFEST_MARKER: manifest.FORMAT}, ckpt_dir)
    if torch.distributed.get_rank() == 0:
        write_model_config(ckpt_dir, model)
    torch.distributed.barrier()
    write_manifest(ckpt_dir)
