"""Hugging Face <-> Megatron checkpoint conversion (Llama 2/3, Mistral, Qwen2/2.5, Qwen3, Qwen3-MoE, Mixtral).

The Megatron side is a dist_checkpointing (torch_dist) directory plus model_config.yaml;
the trainer loads it at any TP/PP/VPP/EP layout with ``checkpoint.weights.load_megatron_weights``.
See dist_entries.py for how the vocabulary rows are stored.
"""

from anchored_megatron.convert.errors import ConvertError
from anchored_megatron.convert.hf_to_megatron import hf_to_megatron
from anchored_megatron.convert.megatron_to_hf import megatron_to_hf
from anchored_megatron.convert.registry import supported_architectures

__all__ = ["ConvertError", "hf_to_megatron", "megatron_to_hf", "supported_architectures"]
