"""Qwen3 (dense): per-head RMSNorm on q and k before RoPE.

Megatron-Core 0.16.1's local layer spec supports this (``qk_layernorm=True`` with
RMSNorm builds ``self_attention.q_layernorm`` / ``k_layernorm`` over head_dim).
Real Qwen3 checkpoints set head_dim=128 independently of hidden_size; it maps onto
ModelConfig.kv_channels (family.to_model_config).
"""

from anchored_megatron.convert.errors import ConvertError
from anchored_megatron.convert.family import Family


def _check(cfg: dict, where: str) -> None:
    if cfg.get("attention_bias"):
        raise ConvertError(f"{where}: attention_bias=true is not supported for Qwen3 (o_proj bias has no Megatron counterpart)")
    if cfg.get("use_sliding_window"):
        raise ConvertError(f"{where}: use_sliding_window=true is not supported (the Megatron model attends over the full context)")


QWEN3 = Family(name="qwen3", architecture="Qwen3ForCausalLM", model_type="qwen3", qk_layernorm=True, check=_check,
               extra_hf_keys={"use_sliding_window": False, "attention_bias": False})
