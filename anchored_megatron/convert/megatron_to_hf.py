"""Megatron dist checkpoint (converted or written by the trainer) -> HF safetensors + config.json.

Reads one layer at a time (one dist_checkpointing read per layer, touching only that
layer's bytes) and writes safetensors shards as they fill, so host memory holds about
one output shard plus one layer. Only model tensors are read; a trainer checkpoint's
optimizer state stays on disk. Padded vocabulary rows are dropped.
"""

from __future__ import annotations

import itertools
import json
import os

import torch

from anchored_megatron.config import ModelConfig
from anchored_megatron.convert.errors import ConvertError
from anchored_megatron.convert.family import Family, to_hf_config, to_model_config
from anchored_megatron.convert.hf_io import HFShardWriter, copy_tokenizer, read_config
from anchored_megatron.convert.hf_to_megatron import check_dtype, check_empty_output
from anchored_megatron.convert.mapping import is_vocab_key, megatron_shapes, rules
from anchored_megatron.convert.megatron_io import (
    load_entries, load_hf_config, load_model_config, single_process_group, stored_shapes,
)
from anchored_megatron.convert.progress import progress_bar
from anchored_megatron.convert.registry import family_for_hf_config, family_for_model_config

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
_ARCH_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                "vocab_size", "rotary_base", "rope_scaling", "norm_epsilon", "tie_embeddings", "qkv_bias", "qk_layernorm")


def _export_config(ckpt_dir: str, model: ModelConfig, dtype: str, hf_config_source: str | None, family_name: str | None) -> tuple[dict, Family]:
    """config.json to write: the source HF config when known (checked against the checkpoint), else synthesised."""
    if hf_config_source is not None:
        base = read_config(hf_config_source) if os.path.isdir(hf_config_source) else _read_json(hf_config_source)
        where = hf_config_source
    else:
        base, where = load_hf_config(ckpt_dir), os.path.join(ckpt_dir, "hf_config.json")
    if base is None:
        family = family_for_model_config(model, family_name)
        return to_hf_config(family, model, dtype), family
    family = family_for_hf_config(base, where)
    implied = to_model_config(family, base, where, dtype)
    mismatched = [f"{f}: config {getattr(implied, f)!r} vs checkpoint {getattr(model, f)!r}"
                  for f in _ARCH_FIELDS if getattr(implied, f) != getattr(model, f)]
    if mismatched:
        raise ConvertError(f"{where}: does not describe the checkpoint in {ckpt_dir}: " + "; ".join(mismatched))
    config = dict(base)
    dtype_name = {"fp32": "float32", "bf16": "bfloat16"}[dtype]
    dtype_key = "torch_dtype" if "torch_dtype" in config and "dtype" not in config else "dtype"
    config[dtype_key] = dtype_name
    return config, family


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise ConvertError(f"--hf-config {path}: not found") from None


def _check_shapes(ckpt_dir: str, model: ModelConfig, stored: dict) -> None:
    expected = megatron_shapes(model)
    for key, shape in expected.items():
        if key not in stored:
            raise ConvertError(f"{ckpt_dir}: model tensor {key} is missing (found keys like {', '.join(sorted(stored)[:3])})")
        found = stored[key]
        if is_vocab_key(key):
            if found[1:] != shape[1:] or found[0] < model.vocab_size:
                raise ConvertError(f"{ckpt_dir}: {key} has shape {list(found)}, expected at least [{model.vocab_size}, {shape[1]}]")
        elif found != shape:
            raise ConvertError(f"{ckpt_dir}: {key} has shape {list(found)}, model_config.yaml implies {list(shape)}")


def megatron_to_hf(
    ckpt_dir: str,
    out_dir: str,
    dtype: str,
    hf_config_source: str | None = None,
    tokenizer_dir: str | None = None,
    family_name: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    show_progress: bool = True,
) -> list[str]:
    """Export; returns the file names written to ``out_dir``."""
    torch_dtype = check_dtype(dtype)
    check_empty_output(out_dir)
    model = load_model_config(ckpt_dir)
    hf_config, _ = _export_config(ckpt_dir, model, dtype, hf_config_source, family_name)
    all_rules = rules(model)
    # One read per layer; the non-layer tensors (embedding, final norm, output) in one read.
    by_layer = [list(g) for _, g in itertools.groupby(sorted(all_rules, key=lambda r: -1 if r.layer is None else r.layer), key=lambda r: r.layer)]
    with single_process_group():
        stored = stored_shapes(ckpt_dir)
        _check_shapes(ckpt_dir, model, stored)
        os.makedirs(out_dir, exist_ok=True)
        writer = HFShardWriter(out_dir, max_shard_bytes)
        stored_dtype = _stored_dtype(ckpt_dir)
        for group in progress_bar(by_layer, "export layers", show_progress):
            loaded = load_entries(ckpt_dir, group, model, stored, dtype=stored_dtype)
            for rule in group:
                tensor = loaded.pop(rule)
                if is_vocab_key(rule.key):
                    tensor = tensor[: model.vocab_size]  # drop padded rows
                for name, piece in zip(rule.hf_names, rule.to_hf(tensor)):
                    writer.add(name, piece.to(torch_dtype))
            del loaded
        files = writer.finish()
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as fh:
        json.dump(hf_config, fh, indent=2, sort_keys=True)
    files.append("config.json")
    if tokenizer_dir is not None:
        files += copy_tokenizer(tokenizer_dir, out_dir)
    return files


def _stored_dtype(ckpt_dir: str) -> torch.dtype:
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load_tensors_metadata(ckpt_dir)["decoder.final_layernorm.weight"].dtype
