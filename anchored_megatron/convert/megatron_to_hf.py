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

from anchored_megatron.checkpoint.dirs import resolve_checkpoint_dir
from anchored_megatron.checkpoint.model_config import HF_CONFIG_NAME, load_hf_config, load_model_config
from anchored_megatron.checkpoint.weights import single_process_group
from anchored_megatron.config import ModelConfig
from anchored_megatron.convert.dist_entries import load_entries, stored_shapes
from anchored_megatron.convert.errors import ConvertError
from anchored_megatron.convert.family import HF_DTYPE_NAMES, Family, to_hf_config, to_model_config
from anchored_megatron.convert.hf_io import HFShardWriter, copy_tokenizer, read_json
from anchored_megatron.convert.hf_to_megatron import check_dtype, check_empty_output
from anchored_megatron.convert.mapping import is_vocab_key, megatron_shapes, rules
from anchored_megatron.convert.progress import progress_bar
from anchored_megatron.convert.registry import family_for_hf_config, family_for_model_config

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
ARCH_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
               "vocab_size", "rotary_base", "rope_scaling", "norm_epsilon", "tie_embeddings", "qkv_bias", "qk_layernorm",
               "num_moe_experts", "moe_router_topk", "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size",
               "moe_router_pre_softmax")


def _export_config(ckpt_dir: str, model: ModelConfig, dtype: str, hf_config_source: str | None, family_name: str | None,
                   tokenizer_dir: str | None) -> tuple[dict, Family]:
    """(config.json to write, its family): the source HF config when known (checked against the
    checkpoint; only its dtype changes), else one synthesised from model_config.yaml and the tokenizer."""
    if hf_config_source is not None:
        where = os.path.join(hf_config_source, "config.json") if os.path.isdir(hf_config_source) else hf_config_source
        base = read_json(where, "--hf-config")
    else:
        where, base = os.path.join(ckpt_dir, HF_CONFIG_NAME), load_hf_config(ckpt_dir)
    if base is None:
        family = family_for_model_config(model, family_name)
        return {**to_hf_config(family, model, dtype), **_special_token_ids(tokenizer_dir)}, family
    family = family_for_hf_config(base, where)
    if family_name is not None and family_name != family.name:
        raise ConvertError(f"--family {family_name}: {where} describes a {family.name} model")
    implied = to_model_config(family, base, where, dtype)
    mismatched = [f"{f}: config {getattr(implied, f)!r} vs checkpoint {getattr(model, f)!r}"
                  for f in ARCH_FIELDS if getattr(implied, f) != getattr(model, f)]
    if mismatched:
        raise ConvertError(f"{where}: does not describe the checkpoint in {ckpt_dir}: " + "; ".join(mismatched))
    config = dict(base)
    dtype_key = "torch_dtype" if "torch_dtype" in config and "dtype" not in config else "dtype"
    config[dtype_key] = HF_DTYPE_NAMES[dtype]
    return config, family


def _special_token_ids(tokenizer_dir: str | None) -> dict:
    """bos/eos/pad ids for a synthesised config: the tokenizer's when given, else explicitly
    unknown, so that transformers' per-family defaults (Llama: bos 1, eos 2) do not apply."""
    if tokenizer_dir is None:
        return {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    from anchored_megatron.data.tokenizer import TokenizerError, load_tokenizer

    try:
        tokenizer = load_tokenizer(tokenizer_dir)
    except TokenizerError as exc:
        raise ConvertError(f"--tokenizer: {exc}") from None
    # The tokenizer stands EOS in for a missing pad token; only a distinct pad is its own.
    pad = tokenizer.pad_id if tokenizer.pad_id != tokenizer.eos_id else None
    return {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": pad}


def check_shapes(ckpt_dir: str, model: ModelConfig, stored: dict) -> None:
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
    iteration: int | None = None,
) -> list[str]:
    """Export; returns the file names written to ``out_dir``.

    ``ckpt_dir`` is a checkpoint directory or a trainer output_dir (its newest checkpoint,
    or the one saved at step ``iteration``).
    """
    torch_dtype = check_dtype(dtype)
    ckpt_dir = resolve_checkpoint_dir(ckpt_dir, "--ckpt", iteration)
    check_empty_output(out_dir)
    model = load_model_config(ckpt_dir)
    hf_config, family = _export_config(ckpt_dir, model, dtype, hf_config_source, family_name, tokenizer_dir)
    all_rules = rules(model, family.experts)
    outside_layers = [r for r in all_rules if r.layer is None]  # embedding, final norm, output layer
    layers = [[r for r in all_rules if r.layer == i] for i in range(model.num_layers)]
    with single_process_group():
        stored = stored_shapes(ckpt_dir)
        check_shapes(ckpt_dir, model, stored)
        os.makedirs(out_dir, exist_ok=True)
        writer = HFShardWriter(out_dir, max_shard_bytes)
        dtype_stored = stored_dtype(ckpt_dir)
        # One read per layer, and one for the tensors outside the layers.
        for group in itertools.chain([outside_layers], progress_bar(layers, "export", "layer", show_progress)):
            loaded = load_entries(ckpt_dir, group, model, stored, dtype=dtype_stored)
            for rule in group:
                tensor = loaded.pop(rule)
                if is_vocab_key(rule.key):
                    tensor = tensor[: model.vocab_size]  # drop padded rows
                for name, piece in zip(rule.hf_names, rule.to_hf(tensor)):
                    writer.add(name, piece.to(torch_dtype))
            del loaded
        files = writer.finish()
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as fh:
        # The source's key order and save_pretrained's layout: a diff against the source shows only the dtype.
        json.dump(hf_config, fh, indent=2)
        fh.write("\n")
    files.append("config.json")
    if tokenizer_dir is not None:
        files += copy_tokenizer(tokenizer_dir, out_dir)
    return files


def stored_dtype(ckpt_dir: str) -> torch.dtype:
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load_tensors_metadata(ckpt_dir)["decoder.final_layernorm.weight"].dtype
