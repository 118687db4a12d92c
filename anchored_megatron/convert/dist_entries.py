"""The converters' side of a Megatron checkpoint: one ``mapping.Rule`` entry at a time.

Writing, every tensor is saved as a TP=1/PP=1 model would save it (layers stacked on a leading
axis under one key, fc1 as two fragments), built directly from per-tensor data, so conversion
never instantiates a model. ``embedding.word_embeddings.weight`` and ``output_layer.weight``
are saved with exactly ``vocab_size`` rows (no padding), so the checkpoint does not depend on
any TP layout (``checkpoint.weights`` says how a model at any TP loads them). Checkpoints the
trainer writes hold the padded rows of its own TP; export reads whatever row count is stored
and keeps the first ``vocab_size``.

Reading, entries are streamed (``load_entries``: one dist_checkpointing read that touches only
their bytes), with the shapes taken from the metadata alone (``stored_shapes``). Callers run
inside ``checkpoint.weights.single_process_group``, which installs the safe loading.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from anchored_megatron.config import ModelConfig
from anchored_megatron.convert.errors import ConvertError
from anchored_megatron.convert.mapping import ATTENTION_LINEARS, EXPERT_LINEARS, EXPERTS_KEY, EXTRA_STATE_LINEARS, Rule


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
