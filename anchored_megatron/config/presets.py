"""Model sizes by name: ``model.preset: llama3-8b`` fills in every field the config leaves unset."""

from __future__ import annotations

import dataclasses

from anchored_megatron.config.errors import ConfigError
from anchored_megatron.config.model import ModelConfig

PRESETS: dict[str, dict] = {
    # Tests and the CPU demo.
    "tiny": dict(num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2, vocab_size=256, seq_length=64),
    "small": dict(num_layers=4, hidden_size=128, ffn_hidden_size=384, num_attention_heads=4, num_query_groups=2, vocab_size=512, seq_length=128),
    "llama3-1b": dict(
        num_layers=16, hidden_size=2048, ffn_hidden_size=8192, num_attention_heads=32, num_query_groups=8,
        vocab_size=128256, seq_length=8192, rotary_base=500000.0, tie_embeddings=True, norm_epsilon=1e-5,
        rope_scaling=dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192),
    ),
    "llama3-8b": dict(
        num_layers=32, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32, num_query_groups=8,
        vocab_size=128256, seq_length=8192, rotary_base=500000.0, norm_epsilon=1e-5,
    ),
    "llama3-70b": dict(
        num_layers=80, hidden_size=8192, ffn_hidden_size=28672, num_attention_heads=64, num_query_groups=8,
        vocab_size=128256, seq_length=8192, rotary_base=500000.0, norm_epsilon=1e-5,
    ),
    # 128 experts, 8 per token; head_dim 128 apart from hidden / heads (64); ffn 6144 is Qwen3-MoE's
    # dense size (unused: every layer is MoE) and kept so that the converted config matches.
    "qwen3-30b-a3b": dict(
        num_layers=48, hidden_size=2048, ffn_hidden_size=6144, num_attention_heads=32, num_query_groups=4, kv_channels=128,
        vocab_size=151936, seq_length=40960, rotary_base=1000000.0, norm_epsilon=1e-6, qk_layernorm=True,
        num_moe_experts=128, moe_router_topk=8, moe_ffn_hidden_size=768,
    ),
    "qwen2.5-3b": dict(
        num_layers=36, hidden_size=2048, ffn_hidden_size=11008, num_attention_heads=16, num_query_groups=2,
        vocab_size=151936, seq_length=32768, rotary_base=1000000.0, norm_epsilon=1e-6, tie_embeddings=True, qkv_bias=True,
    ),
}


def apply_preset(config: ModelConfig, explicit: frozenset[str] | set[str] = frozenset()) -> ModelConfig:
    """A copy with the preset's values in every field not in ``explicit`` (field names the user
    set). A value set to the field's default still counts as set, so it is never overridden."""
    if config.preset is None:
        return config
    if config.preset not in PRESETS:
        raise ConfigError(f"model.preset: unknown preset {config.preset!r} (known: {', '.join(sorted(PRESETS))})")
    preset = {name: value for name, value in PRESETS[config.preset].items() if name not in explicit}
    return dataclasses.replace(config, **preset)
