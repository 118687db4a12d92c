"""HF safetensors -> Megatron dist checkpoint, one tensor at a time.

Each HF tensor is read, reshuffled (qkv interleave), cast to the requested dtype and
kept only as its Megatron form, so host memory holds the output checkpoint plus one
layer's inputs: no model is instantiated and nothing is held twice.
"""

from __future__ import annotations

import os

import torch

from anchored_megatron.checkpoint.weights import save_weights_state, single_process_group
from anchored_megatron.config import ConfigError, ModelConfig, ParallelConfig
from anchored_megatron.convert.dist_entries import entry_name, extra_state_objects, sharded_tensor
from anchored_megatron.convert.errors import ConvertError
from anchored_megatron.convert.family import Family, to_model_config
from anchored_megatron.convert.hf_io import HFReader, read_config
from anchored_megatron.convert.mapping import hf_shapes, rules
from anchored_megatron.convert.progress import progress_bar
from anchored_megatron.convert.registry import family_for_hf_config
from anchored_megatron.models.dtypes import DTYPES

EXPORT_DTYPES = ("bf16", "fp32")


def check_dtype(dtype: str) -> torch.dtype:
    if dtype not in EXPORT_DTYPES:
        raise ConvertError(f"--dtype: must be one of {', '.join(EXPORT_DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def check_empty_output(out_dir: str) -> None:
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise ConvertError(f"--out {out_dir}: directory exists and is not empty; refusing to overwrite")


def owned(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as a contiguous tensor that owns exactly its storage.

    The torch_dist writer clones views of larger storages, so handing it owned tensors
    keeps the checkpoint from being held twice.
    """
    tensor = tensor.contiguous()
    if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        tensor = tensor.clone()
    return tensor


def plan(hf_dir: str, dtype: str, transformer_impl: str = "local", target: ParallelConfig | None = None) -> tuple[ModelConfig, Family, HFReader]:
    """Validate everything that can be validated before writing: config, layout, shards."""
    check_dtype(dtype)
    hf_config = read_config(hf_dir)
    where = os.path.join(hf_dir, "config.json")
    family = family_for_hf_config(hf_config, where)
    model = to_model_config(family, hf_config, where, dtype, transformer_impl)
    if target is not None:
        try:
            target.validate()
            model.validate(target)
        except ConfigError as exc:
            raise ConvertError(f"{where}: cannot run at tp={target.tp}, pp={target.pp}, ep={target.ep}: {exc}") from None
    reader = HFReader(hf_dir)
    optional = {"lm_head.weight"} if model.tie_embeddings else set()
    reader.validate(hf_shapes(model, family.experts), optional=optional)
    return model, family, reader


def hf_to_megatron(
    hf_dir: str,
    out_dir: str,
    dtype: str,
    transformer_impl: str = "local",
    target: ParallelConfig | None = None,
    show_progress: bool = True,
) -> ModelConfig:
    """Convert; returns the ModelConfig written next to the checkpoint."""
    torch_dtype = check_dtype(dtype)
    check_empty_output(out_dir)
    model, family, reader = plan(hf_dir, dtype, transformer_impl, target)
    entries = {}
    all_rules = rules(model, family.experts)
    for rule in progress_bar(all_rules, "read HF", "tensor", show_progress):
        pieces = [reader.get(name) for name in rule.hf_names]
        entries[entry_name(rule)] = sharded_tensor(rule, owned(rule.to_megatron(pieces).to(torch_dtype)), model.num_layers)
        del pieces
    reader.close()
    for layer in range(model.num_layers):
        entries.update(extra_state_objects(layer, model))
    os.makedirs(out_dir, exist_ok=True)
    with single_process_group():
        save_weights_state(entries, out_dir, model, hf_config_file=os.path.join(hf_dir, "config.json"))
    return model
